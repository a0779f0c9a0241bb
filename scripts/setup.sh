#!/usr/bin/env bash
# Sets up thighseg on a Debian 12 machine (Debian packages, a virtual environment in .venv with
# every Python dependency), then runs what is asked:
#   scripts/setup.sh demo [thighseg demo options]   the whole product on CPU with a synthetic study
#   scripts/setup.sh test [pytest options]          the test suite
#   scripts/setup.sh                                 set up only
set -euo pipefail
cd "$(dirname "$0")/.."

# storescu/storescp, dciodvfy, perf_analyzer's libb64, a PACS, promtool (lints our /metrics)
DEBIAN_PACKAGES=(dcmtk dicom3tools libb64-0d orthanc orthanc-dicomweb prometheus)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp ]]; then
    echo "installing Python packages into .venv (torch for training/export included; a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[serve,train,bench,test]"
    touch "$stamp"
fi
# checkov (Kubernetes manifest scanner) has many pinned dependencies of its own: separate venv.
if [[ ! -x .venv-tools/bin/checkov ]]; then
    "$PYTHON" -m venv .venv-tools
    .venv-tools/bin/python -m pip install -q "checkov==3.3.30"
fi

command="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command" in
    demo) exec .venv/bin/thighseg demo "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    "") echo "set up; run .venv/bin/thighseg --help" ;;
    *) echo "usage: scripts/setup.sh [demo|test] [options]" >&2; exit 2 ;;
esac
