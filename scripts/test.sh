#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test (unit, integration, end to end).
# Real captured data is read from ../shared/fixtures-upstream (override with
# SLUICE_UPSTREAM_FIXTURES); tests that need it fail loudly when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked --no-fail-fast
