# userspace-proxy: the commands a newcomer needs.
#   make demo   the proxy doing its job in throwaway network namespaces (root)
#   make test   every test: unit, loopback integration, and the netns end-to-end suite (root;
#               without root the e2e suite skips with a loud message)
#   make lint   rustfmt --check and clippy -D warnings
#   make bench  the side-by-side benchmark (root)

CARGO ?= cargo

.PHONY: all build test lint fmt demo bench e2e doc clean

all: lint test

build:
	$(CARGO) build --release

test:
	$(CARGO) test --all-targets

e2e:
	$(CARGO) test --test netns_e2e

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

demo:
	bash scripts/demo.sh

bench:
	bash bench/run.sh

clean:
	$(CARGO) clean
