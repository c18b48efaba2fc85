//! The module's allocator: dlmalloc, as std uses on this target, but growing
//! the WebAssembly memory in large steps. Each `memory.grow` makes the engine
//! count the new bytes as external memory, and V8 answers with a full garbage
//! collection of the page's heap: growing a page or two at a time (std's way)
//! cost 400 collections for `formatRecords` on 100,000 records given as JSON
//! text, and the time grew with the square of the input.

// A global allocator cannot be written without `unsafe`; this module is the
// crate's only exception to `unsafe_code = "deny"`.
#![allow(unsafe_code)]

use core::alloc::{GlobalAlloc, Layout};
use core::arch::wasm32;
use core::cell::UnsafeCell;
use core::ptr;

use dlmalloc::{Allocator, Dlmalloc};

const PAGE: usize = 64 * 1024;
/// The smallest step: 1 MiB.
const MIN_STEP_PAGES: usize = 16;

/// Memory from `memory.grow`, at least an eighth of what the module already
/// has, so that a growing module asks a few dozen times, not thousands; at
/// most an eighth is spare.
struct GrowInSteps;

// SAFETY: the regions handed out come from `memory.grow` and are never
// given back (WebAssembly memory cannot shrink), which is what dlmalloc
// expects of an allocator that frees nothing.
unsafe impl Allocator for GrowInSteps {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let need = size.div_ceil(PAGE);
        let step = need.max(wasm32::memory_size(0) / 8).max(MIN_STEP_PAGES);
        // Near the memory's limit the step may not fit where the need does.
        for pages in [step, need] {
            let previous = wasm32::memory_grow(0, pages);
            if previous != usize::MAX {
                let (base, size) = (previous * PAGE, pages * PAGE);
                // A region that ends exactly at 4 GiB would make its end
                // address wrap to 0, which dlmalloc cannot represent: give
                // it a little less (as dlmalloc's own wasm allocator does).
                let size = if base.wrapping_add(size) == 0 {
                    size - 16
                } else {
                    size
                };
                return (base as *mut u8, size, 0);
            }
        }
        (ptr::null_mut(), 0, 0)
    }

    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        // Fresh WebAssembly pages are zeroed.
        true
    }

    fn page_size(&self) -> usize {
        PAGE
    }
}

// The `Sync` below relies on this.
#[cfg(target_feature = "atomics")]
compile_error!("the allocator assumes one thread: build without shared memory (atomics)");

struct StepAllocator(UnsafeCell<Dlmalloc<GrowInSteps>>);

// SAFETY: the module is built without shared memory or threads (each worker
// has its own instance), so no two calls into the allocator overlap.
unsafe impl Sync for StepAllocator {}

// SAFETY: every call forwards to dlmalloc with the layout it was given, on
// the one thread there is (see above).
unsafe impl GlobalAlloc for StepAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { (*self.0.get()).malloc(layout.size(), layout.align()) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { (*self.0.get()).calloc(layout.size(), layout.align()) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { (*self.0.get()).free(ptr, layout.size(), layout.align()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { (*self.0.get()).realloc(ptr, layout.size(), layout.align(), new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: StepAllocator =
    StepAllocator(UnsafeCell::new(Dlmalloc::new_with_allocator(GrowInSteps)));
