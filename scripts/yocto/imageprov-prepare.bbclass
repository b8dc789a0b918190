# imageprov-prepare.bbclass: prepare Mender disk images for per-device stamping.
#
# Add to a layer's classes/ and to the image recipe (or local.conf):
#
#   INHERIT += "imageprov-prepare"
#   IMAGEPROV_SERVER_URL = "https://edge.example.com"
#   IMAGEPROV_TENANT_TOKEN = ""            # optional
#   IMAGEPROV_CONF_TARGET = "rootfs"       # or "data": rootfs checksums unchanged
#
# After the image types are written, every .sdimg/.uefiimg/.gptimg/.biosimg the
# recipe deployed for this build gets the HttpsClient block in mender.conf and a
# /data/mender directory, in place and idempotently (`imageprov prepare`). The
# production line then runs `imageprov stamp` on the deployed image, which touches
# only the data partition. imageprov must be on the build host's PATH (or set
# IMAGEPROV to its path); it needs no root.

IMAGEPROV ?= "imageprov"
IMAGEPROV_SERVER_URL ?= ""
IMAGEPROV_TENANT_TOKEN ?= ""
IMAGEPROV_CONF_TARGET ?= "rootfs"
IMAGEPROV_IMAGE_TYPES ?= "sdimg uefiimg gptimg biosimg"

imageprov_prepare_images() {
    found=0
    for type in ${IMAGEPROV_IMAGE_TYPES}; do
        # IMAGE_NAME, plus IMAGE_NAME_SUFFIX on newer releases (.rootfs);
        # IMAGE_LINK_NAME's symlinks point at the same files and are skipped.
        for image in "${IMGDEPLOYDIR}/${IMAGE_NAME}"*."$type"; do
            [ -f "$image" ] && [ ! -L "$image" ] || continue
            set -- prepare "$image" --conf-target "${IMAGEPROV_CONF_TARGET}"
            if [ -n "${IMAGEPROV_SERVER_URL}" ]; then
                set -- "$@" --server-url "${IMAGEPROV_SERVER_URL}"
            fi
            if [ -n "${IMAGEPROV_TENANT_TOKEN}" ]; then
                set -- "$@" --tenant-token "${IMAGEPROV_TENANT_TOKEN}"
            fi
            bbnote "imageprov: preparing $image"
            ${IMAGEPROV} "$@"
            found=1
        done
    done
    if [ "$found" = 0 ]; then
        bbwarn "imageprov: no ${IMAGEPROV_IMAGE_TYPES} image for ${IMAGE_NAME} in ${IMGDEPLOYDIR}"
    fi
}

IMAGE_POSTPROCESS_COMMAND += "imageprov_prepare_images; "
