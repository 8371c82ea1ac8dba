#!/usr/bin/env bash
# Installs the Debian packages the book needs, or says exactly what to install.
# iverilog, yosys, nextpnr-ice40: the number-converter chapter simulates (Icarus), synthesises its
# Verilog and places and routes one lane for the only open clock-frequency estimate.
# texlive-xetex: matplotlib's PGF backend measures text with xelatex (Pareto fronts exported
# for papers); without it the chapter falls back to a pgfplots file.
set -euo pipefail
PACKAGES=(dataset-fashion-mnist texlive-xetex iverilog yosys nextpnr-ice40)
# chromium, chromium-driver: the browser test reads the built book in headless Chromium.
# make pdf: latexmk and the TeX Live parts of Jupyter Book's LaTeX build (xelatex, FreeSerif).
PACKAGES+=(chromium chromium-driver latexmk texlive-latex-recommended texlive-latex-extra
  texlive-fonts-recommended tex-gyre fonts-freefont-otf)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    echo "[sysdeps] installing ${missing[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    exit 0
  fi
fi
echo "[sysdeps] missing system packages: ${missing[*]}" >&2
echo "[sysdeps] install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}), or use environment.yml with conda, then run make again" >&2
exit 1
