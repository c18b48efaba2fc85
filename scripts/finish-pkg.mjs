// Completes the wasm-pack output in pkg/ as the npm package `handover`:
// re-exports the ExportError class (defined in js/errors.js, which
// wasm-bindgen copies into snippets/), writes package.json with `exports`,
// and puts the package README in place.
import { readFileSync, writeFileSync, readdirSync, existsSync, copyFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = join(root, "pkg");
const fail = (msg) => { console.error(`[finish-pkg] FAILED: ${msg}`); process.exit(1); };

const snippets = existsSync(join(pkg, "snippets")) ? readdirSync(join(pkg, "snippets")) : [];
const dir = snippets.find((d) => existsSync(join(pkg, "snippets", d, "js", "errors.js")));
if (!dir) fail("pkg/snippets/*/js/errors.js not found: did wasm-bindgen change its layout?");
const errorsPath = `./snippets/${dir}/js/errors.js`;

for (const f of ["worker.js", "export.js", "format.js"]) copyFileSync(join(root, "js", f), join(pkg, f));
const mainJs = join(pkg, "handover.js");
let js = readFileSync(mainJs, "utf8");
// exportData is the JavaScript of export.js (worker by default) around the
// wasm's exportDataHere.
const reexport = `export { ExportError } from "${errorsPath}";\nexport { exportData, exportDataInWorker } from "./export.js";\nexport { formatRecords } from "./format.js";\n`;
if (!js.includes(reexport)) writeFileSync(mainJs, js + "\n" + reexport);

// wasm-bindgen declares `[Symbol.dispose]` on its classes (the runtime adds
// it only where the engine has the symbol). TypeScript knows the symbol
// only with lib "esnext.disposable", so without skipLibCheck an app on
// ES2022 + DOM would fail to type-check the package; the classes concerned
// are the package's internals, freed by its own code.
const dts = join(pkg, "handover.d.ts");
writeFileSync(dts, readFileSync(dts, "utf8").replace(/^\s*\[Symbol\.dispose\]\(\): void;\n/gm, ""));

const cargo = readFileSync(join(root, "Cargo.toml"), "utf8");
const version = /\[package\][^[]*?\nversion = "([^"]+)"/s.exec(cargo)?.[1] ?? fail("no version in Cargo.toml");
const extra = ["worker.js", "export.js", "format.js"];
const manifest = {
  name: "handover",
  version,
  description: "GDPR \"download my data\" in the browser: fetch a user's records page by page and write JSON, CSV or XLSX locally, with progress, cancel and retries.",
  license: "MIT OR Apache-2.0",
  type: "module",
  module: "./handover.js",
  main: "./handover.js",
  types: "./handover.d.ts",
  exports: {
    ".": { types: "./handover.d.ts", import: "./handover.js", default: "./handover.js" },
    "./worker.js": "./worker.js",
    "./handover_bg.wasm": "./handover_bg.wasm",
    "./package.json": "./package.json",
  },
  files: ["handover.js", "handover.d.ts", "handover_bg.wasm", "handover_bg.wasm.d.ts", "snippets/", ...extra, "README.md"],
  sideEffects: ["./snippets/*"],
  keywords: ["gdpr", "export", "privacy", "xlsx", "csv", "wasm"],
};
writeFileSync(join(pkg, "package.json"), JSON.stringify(manifest, null, 2) + "\n");
copyFileSync(join(root, "npm", "README.md"), join(pkg, "README.md"));
console.log(`[finish-pkg] pkg/ is npm package handover@${version}`);
