#!/usr/bin/env bash
# Fuzzing, short: builds the cargo-fuzz targets of fuzz/ and runs each for FUZZ_SECONDS
# (default 20) on its seed corpus (fuzz/corpus/<target>/). Exits non-zero on any crash, and
# leaves the crashing input in fuzz/artifacts/<target>/.
#
# cargo-fuzz needs nightly's `-Z` flags; the stable toolchain takes them with
# RUSTC_BOOTSTRAP=1. No sanitizer: keel forbids unsafe code (`unsafe_code = "forbid"`), and a
# panic, an overflow (debug assertions are on) or a failed property is what is looked for.
#
#   FUZZ_SECONDS=600 bash .ci/fuzz.sh            # longer
#   FUZZ_TARGETS="config agent" bash .ci/fuzz.sh # some targets only
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
# The fuzz build (coverage instrumentation) has its own cache, outside the clone.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/keel-fuzz-target}"
seconds="${FUZZ_SECONDS:-20}"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# libFuzzer is C++, built by libfuzzer-sys.
command -v c++ >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++
}

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
cargo fuzz build --sanitizer none

# New inputs go to a scratch corpus, so the committed seeds stay as they are.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
passed=0
failed=0
for target in $targets; do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds}s"
  # A target's dictionary (JSON tokens, edge values), when it has one.
  dict=()
  [ -f "fuzz/dicts/$target.dict" ] && dict=(-dict="fuzz/dicts/$target.dict")
  if ! cargo fuzz run --sanitizer none "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 "${dict[@]}" \
    2>"$scratch/$target.log"; then
    failed=$((failed + 1))
    grep -A3 panicked "$scratch/$target.log" || true
    tail -n 30 "$scratch/$target.log"
    echo "fuzz: $target FAILED (the input is in fuzz/artifacts/$target/)"
  else
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$scratch/$target.log" || true
    passed=$((passed + 1))
    echo "fuzz: $target passed"
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
