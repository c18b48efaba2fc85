# Shortcuts; the scripts are the source of truth.
.PHONY: demo test pkg bench clean
demo:  ## build everything and serve the demo on http://127.0.0.1:8080
	scripts/demo.sh
test:  ## every test (installs what is missing)
	scripts/test.sh
pkg:   ## the npm package in pkg/
	scripts/build-pkg.sh
bench: ## throughput and memory tables
	scripts/bench.sh
clean:
	cargo clean; rm -rf pkg node_modules test-artifacts handover-data handover.db*
