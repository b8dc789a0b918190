#!/usr/bin/env bash
# A production-line example: stamp one image per serial, verify each, and flash it.
#
#   scripts/line-example.sh GOLDEN.sdimg SERIALS.txt TARGET [PKI] [OUT]
#
# TARGET is what the operator names: a block device (/dev/sdX, an SD card in a
# USB writer) or a file. Each device's image is flashed in turn; the script
# waits for Enter before each one so that the operator can change cards. Set
# LINE_NO_PROMPT=1 to flash without waiting (one target, e.g. in a test).
# The CA passphrase comes from IMAGEPROV_CA_PASSPHRASE or --passphrase-file
# through IMAGEPROV_ARGS, never from this script.
set -euo pipefail

usage() { echo "usage: $0 GOLDEN SERIALS TARGET [PKI] [OUT]" >&2; exit 2; }
[ $# -ge 3 ] || usage
golden=$1 serials=$2 target=$3 pki=${4:-pki} out=${5:-images}
imageprov=${IMAGEPROV:-imageprov}
read -r -a extra <<< "${IMAGEPROV_ARGS:-}"

[ -f "$golden" ] || { echo "line: no golden image $golden" >&2; exit 2; }
[ -f "$serials" ] || { echo "line: no serials file $serials" >&2; exit 2; }

# 1. Stamp every device; reruns finish what an interruption left.
$imageprov stamp "$golden" --pki "$pki" --out "$out" --device-ids "$serials" --bmap --json "${extra[@]}" \
  > "$out.stamped.jsonl" || echo "line: some devices failed (see above); flashing the others" >&2

# 2. Verify and flash each delivered image.
while IFS= read -r line; do
  read -r id status image < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1]);
print(d["device_id"], d["status"], d.get("image", "-"))' "$line")
  [ "$status" != failed ] || continue
  $imageprov verify "$image" --ca "$pki/ca-cert.pem" --device-id "$id" > /dev/null \
    || { echo "line: $image fails verification; not flashing it" >&2; exit 1; }
  if [ -z "${LINE_NO_PROMPT:-}" ]; then
    read -r -p "Insert the card for $id into $target and press Enter " _ < /dev/tty
  fi
  if command -v bmaptool > /dev/null; then
    bmaptool copy --bmap "$out/$id.bmap" "$image" "$target"
  else
    # Without a block map every byte is written; conv=fsync flushes the card.
    dd if="$image" of="$target" bs=4M conv=fsync status=progress
  fi
  echo "line: flashed $id to $target"
done < "$out.stamped.jsonl"
