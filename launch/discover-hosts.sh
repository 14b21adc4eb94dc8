#!/usr/bin/env bash
# Host discovery for elastic training: print the hosts of HOSTS_FILE that are available now,
# one "host:slots" per line, for horovodrun --host-discovery-script. Blank lines and lines
# starting with # are skipped; a host without ":slots" gets 1 slot. Edit the file while the
# job runs: a host removed there is drained at the next commit, a host added joins.
#   launch/discover-hosts.sh HOSTS_FILE
set -euo pipefail
file=${1:?usage: $0 HOSTS_FILE (one host:slots per line)}
[ -r "$file" ] || { echo "discover-hosts: cannot read $file" >&2; exit 1; }
while IFS= read -r line || [ -n "$line" ]; do
  line=${line%%#*}; line=${line//[[:space:]]/}
  [ -z "$line" ] && continue
  case $line in *:*) echo "$line" ;; *) echo "$line:1" ;; esac
done <"$file"
