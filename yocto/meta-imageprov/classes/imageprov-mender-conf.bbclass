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
#
# Keys are matched as the Mender client matches them, without regard to ASCII
# case (the Go client 3.x through encoding/json, the C++ client 4.x and later
# through a map ordered by lower-cased keys): "httpsclient" in a conf is the
# HttpsClient block, and is replaced in place, written in Mender's spelling. A
# conf holding one key twice (in one spelling or two) fails the build, since
# the two clients read it differently (3.x merges the two, 4.x keeps the last),
# as does a key with a long s or a Kelvin sign (only 3.x folds those), or a
# string setting of another JSON type: `imageprov prepare`, `stamp` and
# `verify` refuse the same files (imageprov/mender/conf.py).
#
# Trust in the edge (opt-in):
#
#   IMAGEPROV_SERVER_CA = "/path/to/edge-ca.pem"
#
# installs that PEM file (the edge's certificate or its CA, certificates only)
# as IMAGEPROV_SERVER_CERT (0644) and sets ServerCertificate to it in
# IMAGEPROV_MENDER_CONF, as `imageprov stamp --server-ca` does. The client trusts
# it besides the system store. meta-mender's mender-server-certificate recipe
# puts a certificate into the root filesystem's system store instead; this
# variable keeps it where imageprov's line tools can check and replace it, on
# the data partition that updates keep. A change to the file rebuilds the rootfs.

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
IMAGEPROV_SERVER_CA ?= ""
IMAGEPROV_SERVER_CERT ?= "/data/mender/server.crt"
do_rootfs[file-checksums] += "${@'%s:True' % d.getVar('IMAGEPROV_SERVER_CA') if d.getVar('IMAGEPROV_SERVER_CA') else ''}"

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

# Opt-in, for devices that make their own key in their TPM (imageprov stamp or flash --enroll URL):
#
#   IMAGEPROV_ENROLL = "1"
#
# - the block names the key the device makes in its token instead of a file:
#   HttpsClient.Key and Security.AuthPrivateKey IMAGEPROV_ENROLL_KEY_URI (a
#   pkcs11: URI whose PIN the device reads from a file it makes itself), and
#   HttpsClient.SSLEngine and Security.SSLEngine "pkcs11" (libp11's engine, which
#   the Mender client loads by that name), as `imageprov stamp --enroll` writes it;
# - files/imageprov-enroll goes in as /usr/sbin/imageprov-enroll, with
#   imageprov-enroll.service (enabled: at every boot, before the Mender client,
#   it enrolls once and then only checks), imageprov-enroll-renew.timer (enabled:
#   daily, it renews the certificate 30 days before it expires, and restarts the
#   client), and a drop-in that makes the client wait for the enrollment and
#   find the token (PKCS11_MODULE_PATH, TPM2_PKCS11_STORE);
# - IMAGEPROV_ENROLL_PACKAGES go into the image: curl, openssl, certtool
#   (GnuTLS), pkcs11-tool (OpenSC), libp11's engine and the tpm2-pkcs11 module:
#   the last three from meta-oe and meta-security's meta-tpm, which the build
#   must then include (the kernel needs its TPM driver and /dev/tpmrm0).
# Units and drop-ins go into the root filesystem: every update built here carries them.
IMAGEPROV_ENROLL ?= ""
IMAGEPROV_ENROLL_KEY_URI ?= "pkcs11:token=imageprov;object=mender;type=private?pin-source=file:/data/imageprov/token/pin"
IMAGEPROV_ENROLL_PKCS11_MODULE ?= "${libdir}/pkcs11/libtpm2_pkcs11.so"
IMAGEPROV_ENROLL_PACKAGES ?= "curl openssl-bin gnutls-bin opensc libp11 tpm2-pkcs11"
IMAGEPROV_ENROLL_FILES ?= "${IMAGEPROV_LAYERDIR}/files"
IMAGE_INSTALL:append = "${@' ' + d.getVar('IMAGEPROV_ENROLL_PACKAGES') if d.getVar('IMAGEPROV_ENROLL') == '1' else ''}"
do_rootfs[file-checksums] += "${@' '.join('%s/%s:True' % (d.getVar('IMAGEPROV_ENROLL_FILES'), f) for f in \
    ('imageprov-enroll', 'imageprov-enroll.service', 'imageprov-enroll-renew.service', \
     'imageprov-enroll-renew.timer', 'imageprov-enroll-client.conf', 'imageprov-enroll.default')) if d.getVar('IMAGEPROV_ENROLL') == '1' else ''}"
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
ROOTFS_POSTPROCESS_COMMAND += "${@'imageprov_enroll_program ;' if d.getVar('IMAGEPROV_ENROLL') == '1' else ''}"

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

# Mender's spelling of the keys the class reads or writes, with the blocks whose fields are checked too.
IMAGEPROV_KEYS = "ServerURL ServerCertificate TenantToken Servers HttpsClient Security"
IMAGEPROV_STRINGS = "ServerURL ServerCertificate TenantToken HttpsClient.Certificate HttpsClient.Key \
    HttpsClient.SSLEngine Security.AuthPrivateKey Security.SSLEngine"

def imageprov_fold(key):
    """A key as both Mender clients compare it: ASCII letters in lower case, every other character as it is."""
    return "".join(chr(ord(c) | 0x20) if "A" <= c <= "Z" else c for c in key)

def imageprov_spelling(conf, name):
    """The key of conf that the client takes for name, as the file spells it; None if there is none."""
    wanted = imageprov_fold(name)
    return next((key for key in conf if imageprov_fold(key) == wanted), None)

def imageprov_lookup(conf, name):
    key = imageprov_spelling(conf, name)
    return conf[key] if key is not None else None

def imageprov_put(conf, name, value):
    """conf with name set to value, in Mender's spelling, where the file had any spelling of it, else last."""
    key = imageprov_spelling(conf, name)
    if key is None:
        out = dict(conf)
        out[name] = value
        return out
    return dict(((name, value) if k == key else (k, v)) for k, v in conf.items())

def imageprov_parse_conf(text, device_path, d):
    """Parse a mender.conf as imageprov does: bb.fatal for what the clients would read apart or not at all."""
    import json

    class Duplicate(ValueError):
        pass

    def unique(pairs):
        found = {}
        for key, value in pairs:
            if key in found:
                raise Duplicate(key)
            found[key] = value
        return found

    try:
        value = json.loads(text, object_pairs_hook=unique)
    except Duplicate as exc:
        bb.fatal("imageprov: %s in the image holds the key %s twice: the Mender clients read such a file "
                 "differently (3.x merges the two, 4.x and later keep the last); keep one"
                 % (device_path, json.dumps(str(exc))))
    except ValueError as exc:
        bb.fatal("imageprov: %s in the image is not valid JSON: %s" % (device_path, exc))
    if not isinstance(value, dict):
        bb.fatal("imageprov: %s in the image is not a JSON object" % device_path)

    def check_spellings(conf, prefix):
        seen = {}
        for key in conf:
            if "\u017f" in key or "\u212a" in key:
                bb.fatal("imageprov: %s in the image has the key %s, which the Mender client 3.x reads as an "
                         "ASCII key and 4.x and later do not; spell it in ASCII"
                         % (device_path, json.dumps(prefix + key)))
            other = seen.setdefault(imageprov_fold(key), key)
            if other != key:
                bb.fatal("imageprov: %s in the image holds %s and %s, one key to the Mender client, which "
                         "matches keys without regard to case (3.x merges the two, 4.x and later keep the "
                         "last); keep one spelling"
                         % (device_path, json.dumps(prefix + other), json.dumps(prefix + key)))

    check_spellings(value, "")
    for name in ("HttpsClient", "Security"):
        block = imageprov_lookup(value, name)
        if block is not None and not isinstance(block, dict):
            bb.fatal("imageprov: %s in the image has a %s that is not a JSON object" % (device_path, name))
        if block is not None:
            check_spellings(block, name + ".")
    for path in d.getVar("IMAGEPROV_STRINGS").split():
        found = value
        for name in path.split("."):
            found = imageprov_lookup(found, name) if isinstance(found, dict) else None
        if found is not None and not isinstance(found, str):
            bb.fatal("imageprov: %s in the image has a %s that is not a string: the Mender client 3.x then "
                     "loads no configuration at all, 4.x and later skip the key" % (device_path, path))
    return value

def imageprov_server_ca(d):
    """The certificates of IMAGEPROV_SERVER_CA, as written to the image; None if it is not set."""
    import base64
    import binascii
    import os
    import re

    source = d.getVar("IMAGEPROV_SERVER_CA")
    if not source:
        return None
    if not os.path.isabs(source):
        bb.fatal("imageprov: IMAGEPROV_SERVER_CA must be an absolute path (one in a layer, or under TOPDIR), "
                 "not %r" % source)
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        bb.fatal("imageprov: cannot read IMAGEPROV_SERVER_CA %s: %s" % (source, exc.strerror))
    if b"PRIVATE KEY-----" in data:
        # The edge's key is easily taken for its certificate: it must never reach every device.
        bb.fatal("imageprov: IMAGEPROV_SERVER_CA %s holds a private key: give the edge's certificate or "
                 "its CA" % source)
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", data, re.S)
    for block in blocks:
        try:
            der = base64.b64decode(b"".join(block.split()), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if not der.startswith(b"\x30"):  # an X.509 certificate is a DER SEQUENCE
            bb.fatal("imageprov: IMAGEPROV_SERVER_CA %s holds a CERTIFICATE block that is not one" % source)
    if not blocks:
        bb.fatal("imageprov: IMAGEPROV_SERVER_CA %s holds no PEM certificate "
                 "(-----BEGIN CERTIFICATE-----); convert a DER file with openssl x509 -inform der" % source)
    # Certificates only, one after the other: text around them (openssl x509 -text) is dropped.
    return b"".join(b"-----BEGIN CERTIFICATE-----\n" + block.replace(b"\r\n", b"\n")
                    + b"-----END CERTIFICATE-----\n" for block in blocks)

python imageprov_mender_conf() {
    import json
    import os

    if not imageprov_has_mender(d):
        return
    rootfs = d.getVar("IMAGE_ROOTFS")
    target = d.getVar("IMAGEPROV_MENDER_CONF")
    block = {"Certificate": d.getVar("IMAGEPROV_CLIENT_CERT"), "Key": d.getVar("IMAGEPROV_CLIENT_KEY")}
    enroll = imageprov_enroll(d)
    if enroll:
        # The key the device makes in its token, loaded through libp11's engine (imageprov/mender/enroll.py).
        block = {"Certificate": block["Certificate"], "Key": d.getVar("IMAGEPROV_ENROLL_KEY_URI"), "SSLEngine": "pkcs11"}
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
                text = handle.read()
            except UnicodeDecodeError as exc:
                bb.fatal("imageprov: %s in the image is not UTF-8: %s" % (device_path, exc))
        return path, imageprov_parse_conf(text, device_path, d)

    per_device = [block["Certificate"], d.getVar("IMAGEPROV_DEVICE_ID_FILE")]
    per_device += ([] if enroll else [block["Key"]])
    per_device += (["/data/imageprov/enroll/%s" % f for f in ("bootstrap-key.pem", "bootstrap-cert.pem", "enroll.conf")]
                   + ["/data/imageprov/token"]) if enroll else []
    for device_path in per_device:
        # Per-device files (credentials, the id) belong to the line: in a build they would
        # land in sstate and the deploy directory, and every device would share them.
        if os.path.lexists(os.path.join(rootfs, device_path.lstrip("/"))):
            bb.fatal("imageprov: the image holds %s: per-device files must not be built in; "
                     "they are stamped on the production line" % device_path)

    server_ca = imageprov_server_ca(d)
    server_cert = d.getVar("IMAGEPROV_SERVER_CERT")
    if server_ca is not None:
        if not server_cert.startswith("/data/") or ".." in server_cert.split("/"):
            # The data partition: what updates keep, and where imageprov's line tools check it.
            bb.fatal("imageprov: IMAGEPROV_SERVER_CERT must be a path under /data/, not %r" % server_cert)
        imageprov_check_no_link_on_the_way(d, server_cert)
    # Every conf in the image is read, whichever is written: one the clients would read apart fails the build.
    _, main = load(main_conf)
    if target != main_conf:
        # The client reads /etc/mender/mender.conf over the fallback, field by
        # field, keys in any case: what it sets there would silently win over what is written here.
        owned = [imageprov_spelling(main or {}, name) for name in ("HttpsClient", "Security")]
        owned = [key for key in owned if key is not None]
        if server_ca is not None:
            key = imageprov_spelling(main or {}, "ServerCertificate")
            if key is not None and main[key] not in (None, server_cert):
                owned.append(key)
        if owned:
            bb.fatal("imageprov: %s in the image sets %s, which the client reads over %s; "
                     "remove it from the build, or set IMAGEPROV_MENDER_CONF = \"%s\""
                     % (main_conf, " and ".join(owned), target, main_conf))

    path, conf = load(target)
    if conf is None:
        conf, mode = {}, 0o600  # as meta-mender installs both confs: they may hold a tenant token
    else:
        mode = os.stat(path).st_mode & 0o7777
    old = imageprov_lookup(conf, "HttpsClient")
    if old is not None and old != block:
        bb.note("imageprov: replacing HttpsClient %s in %s" % (json.dumps(old), target))
    conf = imageprov_put(conf, "HttpsClient", block)
    auth_key = d.getVar("IMAGEPROV_AUTH_KEY")
    if auth_key not in ("cert", "device"):
        bb.fatal("imageprov: IMAGEPROV_AUTH_KEY must be \"cert\" or \"device\", not %r" % auth_key)
    if enroll and auth_key != "cert":
        bb.fatal("imageprov: IMAGEPROV_ENROLL signs auth requests with the token's key: leave IMAGEPROV_AUTH_KEY "
                 "\"cert\"")
    if auth_key == "cert":
        # Other Security keys (an HSM's settings) are kept, in their place; with the token's key, its engine.
        security = imageprov_put(imageprov_lookup(conf, "Security") or {}, "AuthPrivateKey", block["Key"])
        if enroll:
            security = imageprov_put(security, "SSLEngine", "pkcs11")
        else:
            # A file key: an engine left from a token's conf would be asked to load a file path.
            security = dict((k, v) for k, v in security.items() if imageprov_fold(k) != imageprov_fold("SSLEngine"))
        conf = imageprov_put(conf, "Security", security)
    if server_ca is not None:
        conf = imageprov_put(conf, "ServerCertificate", server_cert)
        cert_path = os.path.join(rootfs, server_cert.lstrip("/"))
        if os.path.islink(cert_path) or (os.path.lexists(cert_path) and not os.path.isfile(cert_path)):
            bb.fatal("imageprov: %s in the image is not a regular file" % server_cert)
        os.makedirs(os.path.dirname(cert_path), mode=0o755, exist_ok=True)
        partial = cert_path + ".imageprov"
        with open(partial, "wb") as handle:
            handle.write(server_ca)
        os.chmod(partial, 0o644)
        os.replace(partial, cert_path)
        bb.note("imageprov: %s holds %s; ServerCertificate in %s names it"
                % (server_cert, d.getVar("IMAGEPROV_SERVER_CA"), target))
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    partial = path + ".imageprov"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    os.chmod(partial, mode)
    os.replace(partial, path)
    bb.note("imageprov: HttpsClient in %s -> %s, %s" % (target, block["Certificate"], block["Key"]))
}

def imageprov_enroll(d):
    """Whether IMAGEPROV_ENROLL is on; bb.fatal for a value that is neither."""
    value = d.getVar("IMAGEPROV_ENROLL") or ""
    if value not in ("", "0", "1"):
        bb.fatal("imageprov: IMAGEPROV_ENROLL must be \"1\" (or unset), not %r" % value)
    return value == "1"

python imageprov_enroll_program() {
    import os
    import re

    if not imageprov_has_mender(d):
        return
    rootfs = d.getVar("IMAGE_ROOTFS")
    files = d.getVar("IMAGEPROV_ENROLL_FILES")
    module = d.getVar("IMAGEPROV_ENROLL_PKCS11_MODULE")
    if not re.fullmatch(r"/[A-Za-z0-9_./+-]+", module) or ".." in module.split("/"):
        bb.fatal("imageprov: IMAGEPROV_ENROLL_PKCS11_MODULE must be an absolute path, not %r" % module)
    units = d.getVar("systemd_system_unitdir") or "/lib/systemd/system"

    def install(source, device_path, mode, replace=()):
        with open(os.path.join(files, source), encoding="utf-8") as handle:
            text = handle.read()
        for old, new in replace:
            text = text.replace(old, new)
        path = os.path.join(rootfs, device_path.lstrip("/"))
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            bb.fatal("imageprov: %s in the image is not a regular file" % device_path)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        partial = path + ".imageprov"
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(partial, mode)
        os.replace(partial, path)

    def enable(unit, target):
        link = os.path.join(rootfs, "etc/systemd/system", target + ".wants", unit)
        os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.join(units, unit), link)

    install("imageprov-enroll", "/usr/sbin/imageprov-enroll", 0o755)
    for unit in ("imageprov-enroll.service", "imageprov-enroll-renew.service", "imageprov-enroll-renew.timer"):
        install(unit, os.path.join(units, unit), 0o644)
    # What the enrollment and the client both need to find the token.
    install("imageprov-enroll.default", "/etc/default/imageprov-enroll", 0o644, [("@MODULE@", module)])
    # Mender 3.x runs as mender-client.service; 4.x and later authenticate in mender-authd.service and
    # download (with HttpsClient's certificate and key too) in mender-updated.service.
    for client in ("mender-client.service", "mender-authd.service", "mender-updated.service"):
        install("imageprov-enroll-client.conf", "/etc/systemd/system/%s.d/imageprov-enroll.conf" % client, 0o644,
                [("@MODULE@", module)])
    enable("imageprov-enroll.service", "multi-user.target")
    enable("imageprov-enroll-renew.timer", "timers.target")
    bb.note("imageprov: /usr/sbin/imageprov-enroll enrolls the device at first boot (imageprov-enroll.service), "
            "the Mender client waits for it; the token: %s" % module)
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
