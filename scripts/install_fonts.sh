#!/usr/bin/env bash
# Fonts, the raqm shaping library and libthai (Thai word breaks) for typographic (FigStep-style) images.
# Best effort: the code falls back to a default font with a warning when these are missing.
set -u
if fc-list 2>/dev/null | grep -qi "NotoSansCJK" && ldconfig -p 2>/dev/null | grep -q libraqm; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q fonts-noto-core fonts-noto-cjk fonts-freefont-ttf libraqm0 libthai0 fontconfig >/dev/null 2>&1) || \
  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fonts-noto-core fonts-noto-cjk fonts-freefont-ttf libraqm0 libthai0 fontconfig >/dev/null 2>&1) || \
  echo "warning: could not install fonts (fonts-noto-core fonts-noto-cjk fonts-freefont-ttf libraqm0); typography falls back"
else
  echo "warning: not root or no apt-get; install fonts-noto-core fonts-noto-cjk fonts-freefont-ttf libraqm0 yourself for correct typography"
fi
