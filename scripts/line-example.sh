#!/usr/bin/env bash
# A production-line example: one card per serial, flashed straight from the golden image.
#
#   scripts/line-example.sh GOLDEN SERIALS [WRITER] [PKI]
#
# WRITER is the card writer's whole-disk device (/dev/sdb, /dev/mmcblk0), or
# "any" (the default) for every removable disk. The operator inserts a card;
# imageprov flash writes the next serial not yet delivered onto it, reads it
# back, verifies the card itself, and says "done: remove card"; then it waits
# for the next card. A card already in the writer when the script starts is
# left alone (take it out and put it back to flash it). Ctrl-C stops after the
# card in progress.
#
# What makes this safe to rerun: a serial already delivered is never written
# to another card (revoking and reissuing is a deliberate act: imageprov flash
# --reissue); a card that fails has its certificate revoked and its serial
# goes to the next card; the exit status is 0 only when every serial was
# delivered. Every card is recorded in PKI/line-log.jsonl.
#
# The CA passphrase comes from IMAGEPROV_CA_PASSPHRASE or --passphrase-file
# through IMAGEPROV_ARGS, never from this script.
set -euo pipefail

usage() { echo "usage: $0 GOLDEN SERIALS [WRITER|any] [PKI]" >&2; exit 2; }
[ $# -ge 2 ] || usage
golden=$1 serials=$2 writer=${3:-any} pki=${4:-pki}
imageprov=${IMAGEPROV:-imageprov}
read -r -a extra <<< "${IMAGEPROV_ARGS:-}"

[ -f "$golden" ] || { echo "line: no golden image $golden" >&2; exit 2; }
[ -f "$serials" ] || { echo "line: no serials file $serials" >&2; exit 2; }

watch=()
if [ "$writer" != any ]; then
  # Never a file, never a typo: a card writer is a whole-disk block device.
  [ -b "$writer" ] || { echo "line: $writer is not a block device (name the card writer, e.g. /dev/sdb)" >&2; exit 2; }
  name=$(basename "$(readlink -f "$writer")")
  [ -e "/sys/block/$name" ] || { echo "line: $writer is a partition; name the whole card writer" >&2; exit 2; }
  watch=(--wait-for "$name")
fi

exec $imageprov flash "$golden" --pki "$pki" --device-ids "$serials" --wait "${watch[@]}" "${extra[@]}"
