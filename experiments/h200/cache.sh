#!/usr/bin/env bash
# Carries a sweep's compile caches (Triton's, TileLang's: /tmp/cache/NAME, sweep.sh's CACHE=NAME) from one device
# session to the next, so that issue 13's two timed runs of the default suite (--gpus 1, --gpus 2) can start warm in
# a session of their own, its 30 device minutes not spent compiling again:
#   cache.sh export NAME: /tmp/cache/NAME as $OUT/cache-NAME.tar.xz.partNN, each under the 16 MB a file comes back
#   cache.sh import NAME: the parts carried in .gpu/cache-NAME/ (at most 64 MiB a call) unpacked into /tmp/cache/NAME
# Triton and TileLang key their caches by source, options and GPU target, not by path: a cache made on one H200
# machine serves another with the same versions (env.json records them).
set -euo pipefail
usage() { echo "usage: cache.sh export|import NAME" >&2; exit 2; }
[ $# -eq 2 ] || usage
name=$2
case "$1" in
export) XZ_OPT=-T0 tar cJf - -C /tmp/cache "$name" | split -b 15000000 -d - "$OUT/cache-$name.tar.xz.part"
        ls -l "$OUT"/cache-"$name".tar.xz.part* ;;
import) mkdir -p /tmp/cache
        cat .gpu/cache-"$name"/cache-"$name".tar.xz.part* | tar xJf - -C /tmp/cache
        du -sh "/tmp/cache/$name" ;;
*) usage ;;
esac
