"""Which transfer syntaxes this install can decode, and the one line that says why not.

pydicom 3 decodes compressed pixel data through plugins; which ones are importable decides what
a series may be stored as. The serve extra declares them (see docs/DESIGN.md "DICOM input"):

- python-gdcm (GDCM, BSD licence; the wheel is Apache-2.0): the only non-GPL decoder pydicom
  has for JPEG Lossless (Process 14, and its Selection Value 1, 1.2.840.10008.1.2.4.70, the
  usual lossless syntax of CT archives); it also decodes JPEG Baseline/Extended, JPEG-LS,
  JPEG 2000 and RLE, so it is the fallback for every compressed syntax. pylibjpeg-libjpeg
  would decode JPEG Lossless too but is GPL-3.0, which cmc (Apache-2.0) does not ship.
- pylibjpeg + pylibjpeg-openjpeg (MIT): pydicom's first choice for JPEG 2000 and the only one
  for HTJ2K; the same package encodes JPEG 2000 for the tests.
- pyjpegls (MIT, CharLS) and Pillow arrive with highdicom: JPEG-LS and JPEG Baseline.
- RLE Lossless and Deflated Explicit VR Little Endian are decoded by pydicom itself.

The storage node asks `can_decode` before it accepts a presentation context, and the loader
calls `undecodable_reason` before it touches pixel data, so a syntax nobody here decodes is
refused in one line naming it (name and UID) and the package that would decode it.
"""

from __future__ import annotations

from functools import cache

from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
    UncompressedTransferSyntaxes,
)

GDCM = "python-gdcm"
OPENJPEG = "pylibjpeg-openjpeg"
INSTALL_HINT = "pip install 'cmc[serve]'"

# Uncompressed syntaxes pydicom reads without any plugin (Deflated is inflated on read).
NATIVE_SYNTAXES = frozenset({*UncompressedTransferSyntaxes, DeflatedExplicitVRLittleEndian})


def decoder_packages(uid: str) -> str:
    """The package(s) that decode `uid` with pydicom, as a user would install them."""
    if uid in NATIVE_SYNTAXES or uid in RLETransferSyntaxes:
        return "pydicom"
    if uid in (HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL):
        return OPENJPEG
    if uid in JPEG2000TransferSyntaxes:
        return f"{OPENJPEG} or {GDCM}"
    if uid in JPEGLSTransferSyntaxes:
        return f"pyjpegls or {GDCM}"
    if uid in (JPEGBaseline8Bit, JPEGExtended12Bit):
        return f"pillow or {GDCM}"
    if uid in JPEGTransferSyntaxes:
        return GDCM
    return ""


def syntax_label(uid: str) -> str:
    """'JPEG Lossless, ... [Selection Value 1]) (1.2.840.10008.1.2.4.70)': name and UID."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else f"transfer syntax {uid}"


@cache
def can_decode(uid: str) -> bool:
    """Whether pixel data stored with transfer syntax `uid` can be decoded by this install."""
    uid = str(uid).strip()
    if uid in NATIVE_SYNTAXES:
        return True
    try:
        return bool(get_decoder(UID(uid)).is_available)
    except (NotImplementedError, ValueError):  # no decoder exists for it in pydicom
        return False


def decodable_syntaxes() -> frozenset[str]:
    """Every standard transfer syntax UID whose pixel data this install decodes."""
    return frozenset(str(uid) for uid in AllTransferSyntaxes if can_decode(str(uid)))


def undecodable_reason(uid: str) -> str | None:
    """None when `uid` decodes here, else one line naming the syntax and what would decode it."""
    if can_decode(uid):
        return None
    packages = decoder_packages(str(uid).strip())
    if not packages:
        return (f"{syntax_label(uid)} cannot be decoded: no decoder for it is known to pydicom "
                "(video, private or unknown transfer syntax); export the series uncompressed")
    return (f"{syntax_label(uid)} cannot be decoded here: install {packages} "
            f"({INSTALL_HINT} declares it)")
