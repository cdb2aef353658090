#!/usr/bin/env bash
# Packs what the studio needs to open a window on the GPU machine, which has no X server: Xvfb,
# xkbcomp and the keymaps, the X client libraries winit loads, the Vulkan loader and Mesa's
# lavapipe (the fallback when NVIDIA's Vulkan driver cannot present to Xvfb), as Debian's amd64
# packages unpacked into one folder, into .gl/glroot.tar.xz (ignored by git; name .gl in the device
# tool's carry). It must stay small (the carried tree is limited to 64 MiB): lavapipe's LLVM links
# libxml2 and libz3 for features lavapipe never calls (manifests, the static analyser's solver), so
# those two are replaced by empty stand-ins with the same symbols and versions, which drops ICU,
# libxml2 and Z3 (55 MB); Intel and AMD drivers, DRI drivers and docs are left out. About 30 MB.
#   bash scripts/device-gl-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$work/lists"
mkdir -p "$work/lists/partial" "$work/debs" "$work/glroot"
apt-get $o update -qq
# The packages and everything they need, less what any Linux system has (libc, systemd, PAM, ...)
# and what only their maintainer scripts use.
apt-cache $o depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances --no-pre-depends xvfb xauth mesa-vulkan-drivers libvulkan1 \
    libxkbcommon-x11-0 libxcursor1 libxi6 libxrandr2 libx11-xcb1 2>/dev/null |
    grep -v -e '^ ' -e '^<' | sort -u |
    grep -v -x -E 'libc6|libgcc-s1|libstdc\+\+6|debconf|debconf-2.0|perl-base|perl|dpkg|tar|coreutils|bash|libselinux1|libpcre2-8-0|zlib1g|libzstd1|liblzma5|libbz2-1.0|libcrypt1|libssl3|libtinfo6|libgmp10|base-files|libacl1|libattr1|libmd0|debianutils|sed|grep|util-linux|mawk|libcap2|libaudit1|libaudit-common|libcap-ng0|init-system-helpers|lsb-base|sysvinit-utils|gzip|findutils|ncurses-base|ncurses-bin|diffutils|hostname|login|passwd|adduser|libpam0g|libpam-modules|libpam-modules-bin|libpam-runtime|libsemanage2|libsemanage-common|libsepol2|libdb5.3|libsystemd0|liblz4-1|libgcrypt20|libgpg-error0|libudev1|libblkid1|libmount1|libsmartcols1|libuuid1|libexpat1|libffi8|gcc-12-base|install-info|mailcap|media-types|mime-support|readline-common|python3.*|libpython3.*|perl-modules-.*|libperl.*|libgdbm.*' \
    > "$work/packages.txt"
(cd "$work/debs" && apt-get $o download $(cat "$work/packages.txt") >/dev/null)
for f in "$work"/debs/*.deb; do dpkg -x "$f" "$work/glroot"; done
cd "$work/glroot"
rm -rf usr/share/doc usr/share/man usr/share/locale usr/share/lintian usr/share/bug usr/share/info
lib=usr/lib/x86_64-linux-gnu
rm -rf "$lib/dri" "$lib"/libvulkan_intel* "$lib"/libvulkan_radeon.so usr/share/vulkan/icd.d/intel* \
    usr/share/vulkan/icd.d/radeon*
# Stand-ins for the libraries LLVM links but lavapipe never calls.
for pair in '^xml:libxml2.so.2' '^Z3_:libz3.so.4'; do
    re=${pair%%:*} so=${pair#*:}
    nm -D --undefined-only "$lib/libLLVM-15.so.1" | awk '{print $2}' | grep -E "$re" > "$work/syms"
    awk -F@ '{print $1}' "$work/syms" | sort -u | sed 's/.*/void &(void){}/' > "$work/stub.c"
    awk -F@ 'NF>1{v[$2]=v[$2]" "$1";"} NF==1{u=u" "$1";"}
        END{for(k in v) printf "%s { global:%s };\n", k, v[k]; if(u!="") printf "UNV { global:%s };\n", u}' \
        "$work/syms" > "$work/stub.map"
    rm -f "$lib/${so%.so.*}".so* 
    gcc -shared -fPIC -Wl,-soname,"$so" -Wl,--version-script="$work/stub.map" -o "$lib/$so" "$work/stub.c"
done
rm -f "$lib"/libicu*
cd - >/dev/null
mkdir -p .gl
tar -cf - -C "$work" glroot | xz -6 > .gl/glroot.tar.xz
ls -la .gl/glroot.tar.xz
