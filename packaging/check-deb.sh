#!/usr/bin/env bash
# CI's packaging step: builds the Debian package (packaging/build-deb.sh), then checks its
# contents, its metadata and maintainer scripts, runs what it installs from an extracted
# copy (never installing it on this machine), and runs lintian, failing on any error or
# warning that packaging/debian/procagent.lintian-overrides does not explain.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

fail() {
  echo "check-deb: $*" >&2
  exit 1
}

# Tools: lintian; dpkg-dev (dpkg-shlibdeps, for the package's Depends) and binutils (strip)
# for cargo-deb; groff-base to render the packaged man pages.
need=()
command -v lintian >/dev/null || need+=(lintian)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v strip >/dev/null || need+=(binutils)
command -v groff >/dev/null || need+=(groff-base)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || fail "missing ${need[*]} and no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

deb=$(packaging/build-deb.sh | tail -n 1)
[ -f "$deb" ] || fail "build-deb.sh made no package (got: $deb)"
echo "== $deb"
dpkg-deb -I "$deb"
dpkg-deb -c "$deb"

# Contents: every path the package must install.
listing=$(dpkg-deb -c "$deb" | awk '{ print $6 }' | sed 's|^\./|/|')
for path in \
  /usr/bin/procagentd \
  /usr/bin/procagent \
  /usr/lib/systemd/system/procagentd.service \
  /etc/procagent/agent.toml \
  /usr/share/doc/procagent/examples/agent.toml.example \
  /usr/share/doc/procagent/copyright \
  /usr/share/doc/procagent/changelog.Debian.gz \
  /usr/share/man/man1/procagent.1.gz \
  /usr/share/man/man1/procagent-logs.1.gz \
  /usr/share/man/man5/agent.toml.5.gz \
  /usr/share/man/man8/procagentd.8.gz \
  /usr/share/bash-completion/completions/procagent \
  /usr/share/zsh/vendor-completions/_procagent \
  /usr/share/fish/vendor_completions.d/procagent.fish \
  /usr/share/lintian/overrides/procagent; do
  grep -qxF "$path" <<<"$listing" || fail "the package lacks $path"
done
# Executables: the two binaries, 0755; nothing else is executable.
execs=$(dpkg-deb -c "$deb" | awk '$1 ~ /^-/ && $1 ~ /x/ { print $1, $6 }' | sed 's| \./| /|' | sort)
[ "$execs" = "-rwxr-xr-x /usr/bin/procagent
-rwxr-xr-x /usr/bin/procagentd" ] || fail "unexpected executables: $execs"

# Metadata.
field() { dpkg-deb -f "$deb" "$1"; }
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ "$(field Package)" = procagent ] || fail "Package: $(field Package)"
[ "$(field Version)" = "$version-1" ] || fail "Version: $(field Version), Cargo.toml says $version"
[ "$(field Architecture)" = "$(dpkg --print-architecture)" ] || fail "Architecture: $(field Architecture)"
[ "$(field Section)" = admin ] || fail "Section: $(field Section)"
[[ "$(field Maintainer)" =~ ^[^\<]+\ \<[^@\>]+@[^\>]+\>$ ]] || fail "Maintainer: $(field Maintainer)"
depends=$(field Depends)
grep -qE '(^|, )adduser(,|$)' <<<"$depends" || fail "Depends lacks adduser (postinst's addgroup): $depends"
grep -qE '(^|, )libc6 \(>= [0-9.]+\)' <<<"$depends" || fail "Depends lacks a versioned libc6: $depends"
description=$(field Description)
synopsis=$(head -n 1 <<<"$description")
cargo_description=$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ "$synopsis" = "$cargo_description" ] || fail "Description's synopsis is '$synopsis', not Cargo.toml's description"
[ "$(wc -l <<<"$description")" -ge 2 ] || fail "Description has no extended description"

# Control files: the conffile, the maintainer scripts.
ctl=$(mktemp -d)
root=$(mktemp -d)
trap 'rm -rf "$ctl" "$root"' EXIT
dpkg-deb -e "$deb" "$ctl"
[ "$(cat "$ctl/conffiles")" = /etc/procagent/agent.toml ] || fail "conffiles: $(cat "$ctl/conffiles")"
for s in postinst prerm postrm; do
  [ -x "$ctl/$s" ] || fail "no executable $s"
  sh -n "$ctl/$s" || fail "$s: syntax error"
done
grep -q 'addgroup --system --quiet procagent' "$ctl/postinst" || fail "postinst creates no procagent group"
grep -q 'deb-systemd-invoke $_dh_action procagentd.service' "$ctl/postinst" || fail "postinst starts no procagentd.service"
grep -q 'deb-systemd-helper enable procagentd.service' "$ctl/postinst" || fail "postinst enables no procagentd.service"
# The group before the unit starts (the agent gives the socket to it at start).
[ "$(grep -n 'addgroup --system' "$ctl/postinst" | cut -d: -f1)" -lt "$(grep -n 'deb-systemd-invoke' "$ctl/postinst" | head -n 1 | cut -d: -f1)" ] ||
  fail "postinst starts the unit before it creates the group"
grep -q 'deb-systemd-invoke stop procagentd.service' "$ctl/prerm" || fail "prerm does not stop procagentd.service on remove"
if grep -q 'delgroup\|groupdel' "$ctl/postrm"; then fail "postrm deletes the group"; fi
grep -q 'rm -rf /var/lib/procagent' "$ctl/postrm" || fail "postrm purge keeps /var/lib/procagent"

# What it installs, from an extracted copy.
dpkg-deb -x "$deb" "$root"
cmp -s "$root/etc/procagent/agent.toml" packaging/agent.toml || fail "the conffile is not packaging/agent.toml"
cmp -s "$root/usr/lib/systemd/system/procagentd.service" systemd/procagentd.service || fail "the unit is not systemd/procagentd.service"
"$root/usr/bin/procagent" --help >/dev/null || fail "procagent --help fails"
[ "$("$root/usr/bin/procagent" --version)" = "procagent $version" ] || fail "procagent --version: $("$root/usr/bin/procagent" --version)"
[ "$("$root/usr/bin/procagentd" --version)" = "procagentd $version" ] || fail "procagentd --version: $("$root/usr/bin/procagentd" --version)"
"$root/usr/bin/procagentd" --config "$root/etc/procagent/agent.toml" --check || fail "the conffile does not pass procagentd --check"
# Every page the unit's Documentation= names is installed, and every packaged page renders.
for ref in $(sed -n 's/^Documentation=//p' systemd/procagentd.service); do
  page=${ref#man:}
  name=${page%(*}
  section=${page#*(}
  section=${section%)}
  [ -f "$root/usr/share/man/man$section/$name.$section.gz" ] || fail "the unit names $ref, which the package does not install"
done
for page in "$root"/usr/share/man/man*/*.gz; do
  warnings=$(zcat "$page" | groff -k -man -Tutf8 -ww -z 2>&1) || fail "groff fails on $page"
  [ -z "$warnings" ] || fail "groff warns on ${page#"$root"}: $warnings"
done
bash -n "$root/usr/share/bash-completion/completions/procagent" || fail "the bash completion does not parse"
grep -q '^#compdef procagent' "$root/usr/share/zsh/vendor-completions/_procagent" || fail "the zsh completion has no #compdef"
grep -q '^complete .*--command procagent .*COMPLETE=fish procagent' "$root/usr/share/fish/vendor_completions.d/procagent.fish" || fail "the fish completion does not call back into procagent"

echo "== lintian"
lintian --display-info --fail-on error,warning "$deb" || fail "lintian found errors or warnings (above)"
echo "check-deb: $deb ok ($(($(date +%s) - start)) s)"
