#!/bin/sh
# fetch_debian_package.sh PACKAGE SUITE DEST [ARCHIVE_URI]
#
# Unpacks PACKAGE as found in Debian SUITE into DEST, without installing it and without
# touching the machine's apt state: a private sources list, lists and cache live in
# DEST.apt/ and are removed afterwards. Only dpkg-deb -x is used, so nothing runs from the
# package. ARCHIVE_URI defaults to the Debian archive this machine's apt sources already use
# for its own release (so mirrors and proxies configured for apt keep working).
set -eu

die() { echo "fetch_debian_package: $*" >&2; exit 1; }
[ $# -ge 3 ] || die "usage: fetch_debian_package.sh PACKAGE SUITE DEST [ARCHIVE_URI]"
package=$1 suite=$2 dest=$3 archive=${4:-}
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "apt-get and dpkg-deb are needed (Debian or a derivative)"

if [ -z "$archive" ]; then
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    # Every index apt would fetch for the configured sources, downloaded or not.
    archive=$(apt-get indextargets --no-release-info \
                  --format '$(SITE) $(RELEASE) $(TARGET_OF) $(COMPONENT)' 2>/dev/null \
              | awk -v c="$codename" '$2 == c && $3 == "deb" && $4 == "main" { print $1; exit }')
    [ -n "$archive" ] || die "no Debian archive for release '$codename' in this machine's apt sources; give one explicitly"
fi

state=$dest.apt
rm -rf "$state"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/parts" "$state/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
options=""
[ -r "$keyring" ] && options="[signed-by=$keyring] "
echo "deb ${options}$archive $suite main" > "$state/sources.list"

# The machine's apt.conf (proxies, retries) still applies; sources, pins, lists and
# caches are ours. Downloads land in our folder, which apt's unprivileged _apt user may not
# be able to write, so the sandbox user is the caller.
set -- -q -o "Dir::Etc::sourcelist=$state/sources.list" -o "Dir::Etc::sourceparts=$state/parts" \
    -o "Dir::Etc::preferences=$state/preferences" -o "Dir::Etc::preferencesparts=$state/parts" \
    -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache" \
    -o "APT::Sandbox::User=$(id -un)" -o "Acquire::Languages=none"
echo "fetch_debian_package: $package from $archive $suite"
apt-get "$@" update >"$state/update.log" 2>&1 || die "apt-get update for '$suite' failed: $(tail -n 1 "$state/update.log")"
(cd "$state/debs" && apt-get "$@" download "$package" >"$state/download.log" 2>&1) \
    || die "apt-get download $package ($suite) failed: $(tail -n 1 "$state/download.log")"

rm -rf "$dest"
dpkg-deb -x "$state"/debs/*.deb "$dest"
dpkg-deb -f "$state"/debs/*.deb Package Version > "$dest/PACKAGE"
rm -rf "$state"
echo "fetch_debian_package: unpacked $(tr '\n' ' ' < "$dest/PACKAGE")into $dest"
