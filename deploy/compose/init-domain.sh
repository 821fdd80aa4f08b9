#!/bin/sh
# The one-shot steps of the Compose domain (deploy/compose/compose.yaml), run as the
# unprivileged hsm-domain user inside the image:
#
#   init-domain.sh ceremony      create the domain in the ceremony volume, once
#   init-domain.sh install NAME  move NAME's bundle from the ceremony volume into NAME's own
#                                volume (mounted at the state directory), once
#
# Both are idempotent, so `docker compose up` can run them on every start: an existing domain
# or an installed bundle is left alone. A bundle is removed from the ceremony volume once it is
# installed, so that each host's private keys exist in exactly one volume.
#
# HSM_CEREMONY_DIR (default /ceremony/domain) and HSM_STATE_DIR (default /var/lib/hsm-domain)
# name the two places; the tests point them at scratch directories.
set -eu
umask 077

ceremony=${HSM_CEREMONY_DIR:-/ceremony/domain}
state=${HSM_STATE_DIR:-/var/lib/hsm-domain}

say() { printf 'init-domain: %s\n' "$*" >&2; }

create_domain() {
  if [ -f "$ceremony/domain.json" ]; then
    say "domain already created in $ceremony"
    return 0
  fi
  # The addresses are the Compose service names: the processes listen on 0.0.0.0 and advertise
  # NAME:PORT, and the certificates name them. --expose-metrics lets the healthchecks and a
  # Prometheus on the Compose network scrape /metrics.
  hsm-domain init "$ceremony" \
    --host hsa-1=hsa-1 --host hsa-2=hsa-2 --host hsa-3=hsa-3 \
    --coordinator coordinator --expose-metrics
}

install_bundle() {
  name=$1
  bundle=$ceremony/bundles/$name
  if [ -f "$state/config.json" ]; then
    say "$name: bundle already installed in $state"
    return 0
  fi
  if [ ! -f "$bundle/config.json" ]; then
    say "$name: $state has no config.json and $bundle has no bundle to install;" \
      "remove the domain's volumes (docker compose down -v) and start again"
    return 1
  fi
  # config.json last: a copy cut short leaves no config.json, so the next start copies again
  # and the process never starts on half a bundle. cp -p keeps the 0600 and 0700 modes.
  for entry in "$bundle"/* "$bundle"/.[!.]*; do
    [ -e "$entry" ] || continue
    [ "${entry##*/}" = config.json ] && continue
    cp -Rp "$entry" "$state/"
  done
  cp -p "$bundle/config.json" "$state/.config.json.tmp"
  mv "$state/.config.json.tmp" "$state/config.json"
  rm -rf "$bundle"
  say "$name: bundle installed in $state and removed from the ceremony volume"
}

case "${1:-}" in
  ceremony) create_domain ;;
  install)
    [ $# -eq 2 ] || { say "usage: init-domain.sh install NAME"; exit 2; }
    install_bundle "$2"
    ;;
  *)
    say "usage: init-domain.sh ceremony | init-domain.sh install NAME"
    exit 2
    ;;
esac
