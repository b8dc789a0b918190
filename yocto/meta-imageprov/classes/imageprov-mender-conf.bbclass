# imageprov-mender-conf.bbclass: merge the client-certificate block that
# imageprov stamps against into the image's mender.conf, in the root
# filesystem tree, before any image type is made from it.
#
# Enable it for image recipes only (local.conf or the distro):
#
#   IMAGE_CLASSES += "imageprov-mender-conf"
#
# IMAGE_CLASSES applies it to every image of the build: one without the Mender
# client (no /etc/mender/mender.conf) is left as it is, with a note.
#
# It lives in classes/, not classes-recipe/: kirkstone's BitBake (2.0) looks for
# classes in classes/ only; later ones look there after classes-recipe/.
#
# The block names where the production line puts each device's key and
# certificate (`imageprov stamp`); the files themselves never enter the build,
# its sstate or its deploy directory.
#
# By default it goes to the data partition's /data/mender/mender.conf, which
# the client reads under /etc/mender/mender.conf and which updates keep:
# meta-mender makes the data partition (.dataimg, and the data partition of
# .sdimg/.uefiimg) from ${IMAGE_ROOTFS}/data, and leaves data/ out of the root
# filesystem image, so rootfs.ext4, the .mender artifact and its checksums do
# not change. The client reads that file as /var/lib/mender/mender.conf, through
# the link to /data/mender that meta-mender makes with its mender-image feature:
# an image where /var/lib/mender is anything else (a directory, as meta-mender
# makes it without mender-image) fails to build, since the block would go where
# the client never reads it. Set IMAGEPROV_MENDER_CONF = "/etc/mender/mender.conf"
# to put it into the root filesystem instead: then every update built here
# carries it.
# ServerURL and TenantToken are meta-mender's (MENDER_SERVER_URL,
# MENDER_TENANT_TOKEN).

IMAGEPROV_MENDER_CONF ?= "/data/mender/mender.conf"
IMAGEPROV_CLIENT_CERT ?= "/data/mender/mender-cert.pem"
IMAGEPROV_CLIENT_KEY ?= "/data/mender/mender-cert-private.pem"
# "cert": the client signs its auth requests with the certificate's key
# (Security.AuthPrivateKey), which an accepting edge checks; "device": leave
# the key the client generates on the device in charge.
IMAGEPROV_AUTH_KEY ?= "cert"
# Where imageprov stamp and flash write the device id (one line: the certificate's
# CN), which the identity script below reads; imageprov always writes it here.
IMAGEPROV_DEVICE_ID_FILE ?= "/data/mender/imageprov-device-id"

# Opt-in, for an edge running `imageprov edge serve --identity attribute:NAME`:
#
#   IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id"
#
# installs the layer's files/mender-device-identity as the Mender client's
# identity script, printing NAME=<the id in IMAGEPROV_DEVICE_ID_FILE>; it fails
# on a device that was not stamped. It is written over the script meta-mender's
# client package ships (the MAC address) in the rootfs tree: a second package
# holding that path would conflict with the client's at do_rootfs, and a
# bbappend would have to name a client recipe that differs between meta-mender
# releases. Being in the rootfs, it is in every update built here.
IMAGEPROV_IDENTITY_ATTRIBUTE ?= ""
IMAGEPROV_IDENTITY_SCRIPT_SOURCE ?= "${IMAGEPROV_LAYERDIR}/files/mender-device-identity"
# A change to the script rebuilds the rootfs, as a change to a variable does.
do_rootfs[file-checksums] += "${IMAGEPROV_IDENTITY_SCRIPT_SOURCE}:True"

# In do_rootfs, after the packages (and meta-mender's two mender.conf files)
# are installed, before the image types are made. Each entry ends in " ;", which
# both rules of OE-core's execute_pre_post_process read as intended:
# - kirkstone splits the list at ";" (an entry without one merges with the next
#   into a function name that does not exist), and BitBake parses the list as
#   shell code for do_rootfs's signature, where a leading ";" is a syntax error;
# - scarthgap and later split at ";" and whitespace alike, and take the words as
#   do_rootfs's vardeps, where "name;" (no space) would not name the function:
#   editing it would not rebuild the rootfs.
ROOTFS_POSTPROCESS_COMMAND += "imageprov_mender_conf ;"
ROOTFS_POSTPROCESS_COMMAND += "${@'imageprov_identity_script ;' if d.getVar('IMAGEPROV_IDENTITY_ATTRIBUTE') else ''}"

IMAGEPROV_MAIN_CONF = "/etc/mender/mender.conf"

def imageprov_has_mender(d):
    """Whether the image holds the Mender client's main conf; a note where it does not."""
    import os
    main_conf = d.getVar("IMAGEPROV_MAIN_CONF")
    if os.path.lexists(os.path.join(d.getVar("IMAGE_ROOTFS"), main_conf.lstrip("/"))):
        return True
    bb.note("imageprov: %s has no %s (an image without the Mender client): left as it is"
            % (d.getVar("PN"), main_conf))
    return False

def imageprov_check_data_link(d, target):
    """Fail unless the client reads a conf under /data/mender: /var/lib/mender must link there."""
    import os
    path = os.path.join(d.getVar("IMAGE_ROOTFS"), "var/lib/mender")
    if os.path.islink(path):
        link = os.readlink(path)
        if os.path.normpath(os.path.join("/var/lib", link)) == "/data/mender":
            return
        found = "a link to %s" % link
    elif os.path.isdir(path):
        found = "a directory"
    elif os.path.lexists(path):
        found = "a file"
    else:
        found = "missing"
    bb.fatal("imageprov: /var/lib/mender in the image is %s, not the link to /data/mender that meta-mender "
             "makes with MENDER_FEATURES mender-image: the Mender client would never read %s. Build the image "
             "with mender-image, or set IMAGEPROV_MENDER_CONF = \"%s\" to write the root filesystem's conf"
             % (found, target, d.getVar("IMAGEPROV_MAIN_CONF")))

def imageprov_check_no_link_on_the_way(d, device_path):
    """Fail where a directory above device_path in the image is a link: it would lead out of the image tree."""
    import os
    rootfs = d.getVar("IMAGE_ROOTFS")
    parents = device_path.strip("/").split("/")[:-1]
    for depth in range(1, len(parents) + 1):
        parent = os.path.join(rootfs, *parents[:depth])
        if os.path.islink(parent):
            # An absolute link resolves on the build host, not in the image.
            bb.fatal("imageprov: /%s in the image is a link to %s: %s would be written through it, out of the "
                     "image tree; set IMAGEPROV_MENDER_CONF to the path it leads to"
                     % ("/".join(parents[:depth]), os.readlink(parent), device_path))

python imageprov_mender_conf() {
    import json
    import os

    if not imageprov_has_mender(d):
        return
    rootfs = d.getVar("IMAGE_ROOTFS")
    target = d.getVar("IMAGEPROV_MENDER_CONF")
    block = {"Certificate": d.getVar("IMAGEPROV_CLIENT_CERT"), "Key": d.getVar("IMAGEPROV_CLIENT_KEY")}
    main_conf = d.getVar("IMAGEPROV_MAIN_CONF")
    if not target.startswith("/") or ".." in target.split("/"):
        bb.fatal("imageprov: IMAGEPROV_MENDER_CONF must be an absolute path, not %r" % target)
    imageprov_check_no_link_on_the_way(d, target)
    if target != main_conf:
        imageprov_check_data_link(d, target)

    def load(device_path):
        path = os.path.join(rootfs, device_path.lstrip("/"))
        if not os.path.lexists(path):
            return path, None
        if os.path.islink(path) or not os.path.isfile(path):
            bb.fatal("imageprov: %s in the image is not a regular file" % device_path)
        with open(path, encoding="utf-8") as handle:
            try:
                value = json.load(handle)
            except ValueError as exc:
                bb.fatal("imageprov: %s in the image is not valid JSON: %s" % (device_path, exc))
        if not isinstance(value, dict):
            bb.fatal("imageprov: %s in the image is not a JSON object" % device_path)
        return path, value

    for device_path in (block["Key"], block["Certificate"], d.getVar("IMAGEPROV_DEVICE_ID_FILE")):
        # Per-device files (credentials, the id) belong to the line: in a build they would
        # land in sstate and the deploy directory, and every device would share them.
        if os.path.lexists(os.path.join(rootfs, device_path.lstrip("/"))):
            bb.fatal("imageprov: the image holds %s: per-device files must not be built in; "
                     "they are stamped on the production line" % device_path)

    if target != main_conf:
        # The client reads /etc/mender/mender.conf over the fallback, field by
        # field: a block there would silently win over the one written here.
        _, main = load(main_conf)
        owned = [key for key in ("HttpsClient", "Security") if key in (main or {})]
        if owned:
            bb.fatal("imageprov: %s in the image sets %s, which the client reads over %s; "
                     "remove it from the build, or set IMAGEPROV_MENDER_CONF = \"%s\""
                     % (main_conf, " and ".join(owned), target, main_conf))

    path, conf = load(target)
    if conf is None:
        conf, mode = {}, 0o600  # as meta-mender installs both confs: they may hold a tenant token
    else:
        mode = os.stat(path).st_mode & 0o7777
    old = conf.get("HttpsClient")
    if old is not None and old != block:
        bb.note("imageprov: replacing HttpsClient %s in %s" % (json.dumps(old), target))
    conf["HttpsClient"] = block
    auth_key = d.getVar("IMAGEPROV_AUTH_KEY")
    if auth_key not in ("cert", "device"):
        bb.fatal("imageprov: IMAGEPROV_AUTH_KEY must be \"cert\" or \"device\", not %r" % auth_key)
    if auth_key == "cert":
        security = conf.get("Security", {})
        if not isinstance(security, dict):
            bb.fatal("imageprov: Security in %s is not a JSON object" % target)
        security["AuthPrivateKey"] = block["Key"]
        conf["Security"] = security
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    partial = path + ".imageprov"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(conf, indent=2) + "\n")
    os.chmod(partial, mode)
    os.replace(partial, path)
    bb.note("imageprov: HttpsClient in %s -> %s, %s" % (target, block["Certificate"], block["Key"]))
}

python imageprov_identity_script() {
    import os
    import re

    if not imageprov_has_mender(d):
        return
    rootfs = d.getVar("IMAGE_ROOTFS")
    attribute = d.getVar("IMAGEPROV_IDENTITY_ATTRIBUTE")
    id_file = d.getVar("IMAGEPROV_DEVICE_ID_FILE")
    source = d.getVar("IMAGEPROV_IDENTITY_SCRIPT_SOURCE")
    # Where the Mender client runs it: a fixed path in the client (3.x and 4.x), not ${datadir}.
    script = "/usr/share/mender/identity/mender-device-identity"
    # The client reads NAME=value lines, split at the first "=": a name without "=", spaces or quotes.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", attribute):
        bb.fatal("imageprov: IMAGEPROV_IDENTITY_ATTRIBUTE must be a name of letters, digits, '_', '.', '-', "
                 "not %r" % attribute)
    if not re.fullmatch(r"/[A-Za-z0-9_./-]+", id_file) or ".." in id_file.split("/"):
        bb.fatal("imageprov: IMAGEPROV_DEVICE_ID_FILE must be an absolute path, not %r" % id_file)
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    for name, value in (("attribute", attribute), ("id_file", id_file)):
        # Both values are checked above to need no quoting beyond single quotes.
        text, count = re.subn(r"^%s='[^'\n]*'$" % name, "%s='%s'" % (name, value), text, flags=re.M)
        if count != 1:
            bb.fatal("imageprov: %s has no single %s='...' line to set" % (source, name))
    path = os.path.join(rootfs, script.lstrip("/"))
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        bb.fatal("imageprov: %s in the image is not a regular file" % script)
    if os.path.lexists(path):
        bb.note("imageprov: replacing the client package's %s" % script)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    partial = path + ".imageprov"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(partial, 0o755)
    os.replace(partial, path)
    bb.note("imageprov: %s prints %s=<the id in %s>" % (script, attribute, id_file))
}
