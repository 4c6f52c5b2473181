#!/usr/bin/env bash
# Fuzzes brokerd-proto's decoder (fuzz/fuzz_targets/decode.rs) for a bounded time.
#
#   scripts/fuzz.sh            # 60 seconds
#   scripts/fuzz.sh 600        # 10 minutes
#   FUZZ_CMIN=1 scripts/fuzz.sh 600   # then minimise fuzz/corpus/decode (commit it if it grew)
#
# Runs on the stable toolchain: `-s none` builds without a sanitizer, which is what needs
# nightly; libFuzzer's coverage instrumentation uses stable codegen flags. No RUSTC_BOOTSTRAP is
# needed (checked with rustc 1.95 and cargo-fuzz 0.13.2). Installs cargo-fuzz from crates.io if
# it is missing. Exits non-zero when the fuzzer finds a crash; the input is then in
# fuzz/artifacts/decode/ (replay it with `cargo fuzz run -s none decode <file>`).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== cargo fuzz run -s none decode, ${secs}s"
before=$(find fuzz/corpus/decode -type f | wc -l)
cargo fuzz run -s none decode -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1
if [[ "${FUZZ_CMIN:-0}" == 1 ]]; then
    echo "== minimising the corpus"
    cargo fuzz cmin -s none decode
fi
after=$(find fuzz/corpus/decode -type f | wc -l)
echo "== corpus: ${before} -> ${after} inputs in fuzz/corpus/decode"
