"""Data for FreeAnchor training and evaluation: COCO-layout datasets, the header check, batching,
sampling, and the built-in synthetic `shapes` dataset.

- `CocoDataset(root, split, train)` reads `root/annotations/instances_<split>.json` and the images
  in `root/<split>/`: COCO 2017 itself, or any data laid out the same way (`split_files`; for
  evaluation, also a list of images without annotations, such as COCO's test-dev). Problems with the
  annotation file are found at construction; `check_images()` then opens every image's header
  (not its pixels) in parallel, so that a missing, broken or mis-sized image stops the run before
  iteration 0, not hours in. Every such problem is one line, a `DataError`, naming the culprits.
- Images are read upright: the EXIF orientation tag is applied as `PIL.ImageOps.exif_transpose`
  does (phone photos; labelling tools show and annotate them that way), unless exif=False.
- Samples are uint8 [3, h, w] at the original size (flipped for training); normalising, resizing
  (shorter side `min_size`, one value or several drawn per image, longer side at most `max_size`,
  the paper's recipe, §4.1) and padding to a multiple of 32 happen inside the step on the device
  (`to_device`), with `model.preprocess`, the function `RetinaNet.detect` uses. A worker then does
  little more than decode the JPEG, and a batch moves a quarter of float32's bytes. Where the
  "device" is the CPU itself, the workers resize instead (`resize_in_worker`), with the same code.
- `TrainSampler` yields iteration-based batches grouped by aspect ratio (landscape and portrait
  apart, as the authors' maskrcnn-benchmark code does), sharded over DDP ranks, and a pure
  function of (seed, iteration), so a resumed run sees exactly the batches of an uninterrupted one.
- `prepare_shapes()` builds `datasets/shapes` once: rendered squares, disks, triangles, bars (1:5)
  and needles (1:8 and thinner) on textured, noisy backgrounds, with a share of crowded images, to
  probe offline the paper's claims about slender (Fig. 5) and crowded (Fig. 6) objects.
- What train.py and evaluate.py share around the data, written once here: their flags built from
  the config dataclasses, device defaults, DDP setup, Ctrl-C and SIGTERM, atomic file writes and
  checkpoint reading (the end of this file).

Use it as train.py does:

    ds = CocoDataset(resolve_root("shapes"), "train2017", train=True)
    ds.check_images()
    loader = DataLoader(ds, batch_sampler=TrainSampler(ds, batch_size=8, min_sizes=(320,)),
                        collate_fn=collate, num_workers=2, pin_memory=True)
    for batch in loader_batches(loader):  # stops the workers at once on a worker's error
        images, gt_boxes, gt_labels = to_device(batch, "cuda")   # [B, 3, H, W] normalised, padded

Build the shapes dataset by hand with `python data.py`; tests: `python -m pytest tests/test_data.py`;
costs: `python benchmarks/data.py`.
"""

import argparse
import codecs
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import fcntl
import gc
import glob
import hashlib
import io
import json
import math
import multiprocessing
import operator
import os
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
import zipfile
from collections import Counter

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFilter, UnidentifiedImageError

from model import (SIZE_DIVISIBLE, batch_images, flip_boxes, host_to_device, prepare_image, preprocess,
                   resize_boxes, resized_size)

# PIL refuses images above 179 million pixels ("decompression bomb"), a guard for files from strangers;
# a dataset's own images may be that large (aerial and satellite tiles), and each is checked against
# its annotated size before training
Image.MAX_IMAGE_PIXELS = None


class DataError(Exception):
    """A problem with the user's data. str(e) is one line that names the culprit (file path,
    image file names, annotation id), meant to be printed as is, without a traceback."""

    def __init__(self, message):
        # A DataError raised inside a DataLoader worker comes back to the main process rebuilt
        # from "Caught DataError in DataLoader worker ...\nOriginal Traceback ...\n
        # data.DataError: <message>" (or data.ImageError): keep only the message. A line break or
        # other control character in it (a file name may hold one) is written as Python escapes it
        # (\n, \r, \x00), so that the message stays one visible line.
        message = str(message)
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = re.split(r"\n(?:\w+\.)*(?:DataError|ImageError): ", message.rstrip("\n"))[-1]
        super().__init__(re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], message))


class ImageError(DataError):
    """An image that fails when decoded: unreadable, or not of its annotated size (what the header
    check finds before training, met later where it was skipped or could not see it). Under torchrun
    one process alone meets it, in its share of the images."""


def available_cpus():
    """CPUs this process may use: more DataLoader workers than that only add contention (and a warning)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _name_some(names, limit=10):
    """'a, b, c' for at most `limit` names, then '... and N more'. A name that would read as
    something else in that list (empty, holding a comma, or with spaces at an end) is quoted."""
    names = [repr(n) if not n or "," in n or n != n.strip() else n for n in map(str, names)]
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------- COCO layout

def resolve_root(data):
    """`--data` argument -> dataset root: "shapes" builds (once) and returns the synthetic
    dataset; anything else is a COCO-layout root that must exist. A dataset of one's own in a
    folder named shapes is given as ./shapes: plain `shapes` with such a folder here is refused
    rather than read as the synthetic one."""
    if data == "shapes":
        if os.path.isdir(os.path.join("shapes", "annotations")):
            raise DataError("--data shapes names the built-in synthetic dataset (built under datasets/shapes), but "
                            "./shapes here holds a dataset: give --data ./shapes to use that one, or run from "
                            "another folder for the synthetic one")
        return prepare_shapes()
    if not os.path.exists(data):
        raise DataError(f"data root not found: {data}")
    if not os.path.isdir(data):
        raise DataError(f"data root is not a directory: {data}")
    return data


def _duplicates(values):
    return [v for v, n in Counter(values).items() if n > 1]


def _is_unicode(text):
    """Whether a string holds only valid characters: JSON's escapes can spell an unpaired UTF-16
    surrogate ("\\ud800"), which Python reads into a str that no encoding accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range (JSON allows any number of digits)
        return False


def _is_id(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _whole_ids_as_int(entries, keys):
    """Ids written as whole-number floats (3.0, as some converters and pandas write them) become
    ints in place, so that they match the same ids written as ints elsewhere in the file."""
    for entry in entries:
        if isinstance(entry, dict):
            for key in keys:
                x = entry.get(key)
                if isinstance(x, float) and x.is_integer():
                    entry[key] = int(x)


def _image_problem(im):
    """What is wrong with one entry of 'images', or None."""
    if not isinstance(im, dict):
        return "not a JSON object"
    if not _is_id(im.get("id")):
        return "no integer 'id'"
    if not isinstance(im.get("file_name"), str) or not im["file_name"]:
        return "no 'file_name'"
    try:  # a byte of a non-UTF-8 name on disk, as json.dump(os.listdir()) writes it, is a surrogate
        os.fsencode(im["file_name"])  # of U+DC80-U+DCFF, which this turns back into that byte
    except UnicodeEncodeError:
        return "a 'file_name' that is no file name (an unpaired surrogate such as \\ud800)"
    for key in ("width", "height"):  # a whole-number float (96.0) is accepted: some tools write sizes that way
        if not _is_number(im.get(key)) or not 1 <= im[key] < 2**31 or im[key] % 1:
            return f"{im['file_name']}: no positive whole '{key}' below 2^31 ({im.get(key)!r})"
    return None


def split_files(root, split):
    """The annotation file and the image folder of a split: root/annotations/instances_<split>.json
    and root/<split>/. Where there is no instances file, COCO's name for a list of images without
    annotations, root/annotations/image_info_<split>.json (test2017, test-dev2017), is read instead.
    COCO's test-dev lists a part of its test images, which COCO distributes in test2017/: the images
    of a split test-dev<year> without a folder of its own are read from root/test<year>/."""
    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    image_list = os.path.join(root, "annotations", f"image_info_{split}.json")
    if not os.path.exists(ann_file) and os.path.exists(image_list):
        ann_file = image_list
    img_dir = os.path.join(root, split)
    dev = re.fullmatch(r"test-dev(\d*)", split)
    if dev and not os.path.exists(img_dir):
        img_dir = os.path.join(root, f"test{dev.group(1)}")
    return ann_file, img_dir


def _load_annotations(ann_file):
    """Read and validate a COCO instances file; returns (its dict with every field we and COCOeval
    need present: 'iscrowd' and 'area' filled in when absent, whether it has annotations). A file
    without an 'annotations' list, such as COCO's image_info_test-dev2017.json, is a list of images
    to detect on: its dict gets an empty one. Raises DataError."""
    if not os.path.isfile(ann_file):
        # the splits the folder has, where the name given is not one of them (instances_train.json
        # for a default of train2017): --train-split, --val-split and --split take their names
        files = sorted(os.listdir(os.path.dirname(ann_file))) if os.path.isdir(os.path.dirname(ann_file)) else []
        splits = [m.group(2) for m in map(re.compile(r"(instances|image_info)_(.+)\.json").fullmatch, files) if m]
        raise DataError(f"annotation file not found: {ann_file}"
                        + (f" (the splits there: {_name_some(dict.fromkeys(splits))})" if splits else ""))
    try:
        with open(ann_file, "rb") as f:
            coco = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError;
        # RecursionError: values nested about a thousand deep, which json.load cannot read
        raise DataError(f"{ann_file}: not valid JSON ({e})") from None
    except OSError as e:
        raise DataError(f"{ann_file}: cannot be read ({e.strerror})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{ann_file}: expected a JSON object with 'images', 'annotations' "
                        f"and 'categories'")
    annotated = "annotations" in coco
    coco.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{ann_file}: missing the '{key}' list")

    def bad(kind, culprits, what):  # one error naming every offending entry
        raise DataError(f"{ann_file}: {kind} {_name_some(culprits)} {what}")

    _whole_ids_as_int(coco["categories"], ("id",))
    _whole_ids_as_int(coco["images"], ("id",))
    _whole_ids_as_int(coco["annotations"], ("id", "image_id", "category_id"))
    cats = coco["categories"]
    if not cats:
        raise DataError(f"{ann_file}: the 'categories' list is empty")
    broken = [i for i, c in enumerate(cats) if not isinstance(c, dict) or not _is_id(c.get("id"))
              or not isinstance(c.get("name"), str)]
    if broken:
        bad("categories at list positions", broken, "need an integer 'id' and a string 'name'")
    cat_ids = [c["id"] for c in cats]
    broken = [c["id"] for c in cats if not _is_unicode(c["name"])]
    if broken:  # it could not be printed, nor written to a file
        bad("category ids", broken, "have a 'name' that is not valid Unicode (an unpaired surrogate such as \\ud800)")
    broken = [i for i in cat_ids if not -2**63 <= i < 2**63]
    if broken:  # pycocotools' np.unique would turn them into float64, merging neighbouring ids
        bad("category ids", broken, "do not fit in 64 bits (signed)")
    if _duplicates(cat_ids):
        bad("category ids", _duplicates(cat_ids), "appear more than once")

    images = coco["images"]
    broken = [f"{i} ({problem})" for i, im in enumerate(images) if (problem := _image_problem(im))]
    if broken:
        bad("images at list positions", broken,
            "need an integer 'id', a non-empty 'file_name' and a positive whole 'width' and 'height' below 2^31")
    image_ids = [im["id"] for im in images]
    broken = [i for i in image_ids if not -2**63 <= i < 2**63]
    if broken:  # CocoDataset keeps them in an int64 array
        bad("image ids", broken, "do not fit in 64 bits (signed)")
    if _duplicates(image_ids):
        bad("image ids", _duplicates(image_ids), "appear more than once")
    names = [im["file_name"] for im in images]
    if _duplicates(names):  # each entry's objects would be the other's background: a merge gone wrong
        bad("file names", _duplicates(names), "are listed under more than one image id (one entry per image, "
            "holding all its annotations)")

    anns = coco["annotations"]
    broken = [i for i, a in enumerate(anns) if not isinstance(a, dict) or not _is_id(a.get("id"))]
    if broken:
        bad("annotations at list positions", broken, "need an integer 'id'")
    broken = [a["id"] for a in anns if not -2**63 <= a["id"] < 2**63]
    if broken:  # CocoDataset keeps them in an int64 array
        bad("annotation ids", broken, "do not fit in 64 bits (signed)")
    broken = [a["id"] for a in anns if not isinstance(a.get("bbox"), list) or len(a["bbox"]) != 4
              or not all(_is_number(v) for v in a["bbox"])]
    if broken:
        bad("annotation ids", broken, "need a 'bbox' of 4 finite numbers [x, y, w, h]")
    broken = [a["id"] for a in anns if not math.isfinite(float(a["bbox"][2]) * float(a["bbox"][3]))]
    if broken:  # each side finite, their product, the box's area, not (2^600 x 2^600)
        bad("annotation ids", broken, "have a 'bbox' whose width x height is not a finite number")
    # A negative width or height is no box at all (corners swapped by a converter, say); a zero or
    # sub-pixel one is a degenerate object, which CocoDataset leaves out of the loss.
    broken = [a["id"] for a in anns if a["bbox"][2] < 0 or a["bbox"][3] < 0]
    if broken:
        bad("annotation ids", broken, "have a 'bbox' [x, y, w, h] with a negative width or height")
    broken = [a["id"] for a in anns if "area" in a and (not _is_number(a["area"]) or a["area"] < 0)]
    if broken:  # COCOeval compares it with its area ranges
        bad("annotation ids", broken, "have an 'area' that is not a number >= 0")
    ann_ids = [a["id"] for a in anns]
    if _duplicates(ann_ids):
        bad("annotation ids", _duplicates(ann_ids), "appear more than once")
    known_images = set(image_ids)
    broken = [f"{a['id']} (image_id {a.get('image_id')!r})" for a in anns if not _is_id(a.get("image_id"))]
    if broken:
        bad("annotation ids", broken, "need an integer 'image_id'")
    broken = [a["id"] for a in anns if a["image_id"] not in known_images]
    if broken:
        bad("annotation ids", broken, "refer to an image_id that is not in 'images'")
    known_cats = set(cat_ids)
    broken = [a for a in anns if not _is_id(a.get("category_id")) or a["category_id"] not in known_cats]
    if broken:
        culprits = [f"{a['id']} (category_id {a.get('category_id')!r})" for a in broken]
        bad("annotation ids", culprits,
            f"have a category_id not in 'categories' ({', '.join(map(str, sorted(known_cats)))})")
    broken = [a["id"] for a in anns if "iscrowd" in a and a["iscrowd"] not in (0, 1)]
    if broken:
        bad("annotation ids", broken, "have an 'iscrowd' other than 0 or 1")
    for a in anns:  # COCOeval reads both fields of every ground truth
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
    return coco, annotated


# EXIF orientation tag (0x0112) -> the transposition that shows the picture upright: the table of
# PIL.ImageOps.exif_transpose (2-4: mirror/rotate 180, same size; 5-8: width and height swap).
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                  6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# the transposition that undoes each: the two quarter turns undo each other, the others themselves
EXIF_UNDO = {k: {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
                 Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}.get(t, t) for k, t in EXIF_TRANSPOSE.items()}
# PIL's TIFF reader turns a TIFF upright itself (Pillow >= 10.2): its size at open is already the
# upright one where the TIFF's own orientation tag turns it by a quarter (not one from XMP), and
# loading applies the orientation (either) and drops the tag. For the other formats PIL reports
# and decodes the stored pixels.
TURNED_BY_PIL = ("TIFF",)


# PNG text chunks that PIL reads an EXIF orientation from: XMP (tiff:Orientation) and ImageMagick's
# copy of the EXIF block
ORIENTATION_TEXT = (b"XML:com.adobe.xmp", b"Raw profile type exif")


def _png_orientation_after_pixels(path):
    """Whether a PNG file stores, after its pixels, a chunk that PIL reads an EXIF orientation from:
    an eXIf chunk or an ORIENTATION_TEXT text chunk (the PNG format allows them there). PIL reads
    those only when it decodes the pixels. Reads the chunk headers and text keywords, and seeks past
    the rest."""
    after_pixels = False
    with open(path, "rb") as f:
        f.seek(8)  # the PNG signature
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return False
            read = 0
            if after_pixels and kind == b"eXIf":
                return True
            if after_pixels and kind in (b"tEXt", b"zTXt", b"iTXt"):
                read = min(length, 80)  # a keyword of at most 79 bytes, then a zero byte
                if f.read(read).split(b"\0")[0] in ORIENTATION_TEXT:
                    return True
            after_pixels |= kind == b"IDAT"
            f.seek(length - read + 4, os.SEEK_CUR)  # the (rest of the) data and its CRC


def _orientation(img, loaded=False):
    """The EXIF orientation (1-8, 1 = as stored) of an opened PIL image, as exif_transpose reads
    it: from the EXIF block, else from XMP or (PNG) an ImageMagick "Raw profile type exif" text
    chunk. Decodes only a PNG that stores such a chunk after its pixels, where PIL finds it only by
    decoding (PIL's PNG reader would decode every PNG without an EXIF block before its pixels to
    look; once the image is `loaded`, PIL has read them all)."""
    if img.format == "PNG" and not loaded:
        if img.filename and _png_orientation_after_pixels(img.filename):
            img.load()  # PIL reads the chunks after the pixels, as read_image does
            exif = img.getexif()
        else:
            exif = Image.Image.getexif(img)  # PIL's own reading of img.info, without the PNG reader's decoding
    else:
        exif = img.getexif()
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in EXIF_TRANSPOSE else 1


@contextlib.contextmanager
def _open_image(path):
    """Image.open without PIL's UserWarnings on malformed EXIF ("Corrupt EXIF data", "Tag data
    larger than file"): two lines on stderr that name no file, from every loader worker, about
    images that read fine. PIL reads what it can of the EXIF; a lost orientation tag of a turned
    image is still caught by the header check, as a size that does not fit the annotations.
    A named pipe, socket or device is refused before it is opened, which would wait forever."""
    kind = os.stat(path).st_mode  # FileNotFoundError for a missing file, as Image.open would raise
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):  # a directory: PIL's IsADirectoryError
        raise OSError("not a regular file (a named pipe, socket or device)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(path) as img:
            yield img


def read_image(path, exif=True):
    """Decode an image file -> uint8 numpy [h, w, 3] RGB (read-only for an RGB image), upright as
    `PIL.ImageOps.exif_transpose` shows it when `exif` (what labelling tools display), as stored
    otherwise. Any PIL mode becomes RGB. Raises DataError naming the file."""
    try:
        with _open_image(path) as img:
            turned = _orientation(img) if img.format in TURNED_BY_PIL else 1  # what PIL applies as it loads
            img.load()
            if not exif:  # as stored: undo what PIL applied
                method = EXIF_UNDO.get(turned)
            elif turned == 1:  # upright
                method = EXIF_TRANSPOSE.get(_orientation(img, loaded=True))
            else:  # upright already, turned by PIL
                method = None
            array = _to_rgb(img if method is None else img.transpose(method), img.format)
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, EOFError, struct.error, ...)
        raise ImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return array  # [h, w, 3]


# The last bytes of a complete file: a JPEG's end-of-image marker, a PNG's IEND chunk
END_OF_FILE = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # MPO: JPEGs of phones


def _ends_as_it_should(img, path):
    """Whether a JPEG or PNG file ends as a complete one does (other formats: True). A file cut
    short by a copy or a download does not; nor does a JPEG with data after its end (phones append
    some), which decodes fine: _check_one decodes such a file to tell them apart."""
    tail = END_OF_FILE.get(img.format)
    if tail is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - len(tail)))
        return f.read() == tail


def _check_one(path, size, exif):
    """Header check of one image: None when it can be used, else why not (a few words).
    Opens the file and parses its header (size, mode, EXIF) and reads its last bytes; decodes
    only a JPEG or PNG that does not end as a complete file does (cut short, or with data after
    its end)."""
    return _inspect(path, size, exif)[0]


def _inspect(path, size, exif):
    """_check_one's answer and the image's EXIF orientation (1 where it has none or is unreadable)."""
    orientation = 1
    try:
        with _open_image(path) as img:
            w, h = img.size
            orientation = _orientation(img)
            if img.format in TURNED_BY_PIL and img.tag_v2.get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
                w, h = h, w  # PIL gave the upright size: the stored one
            if not _ends_as_it_should(img, path):
                img.load()  # raises for a file cut short
    except FileNotFoundError:
        return "missing", orientation
    except UnidentifiedImageError:
        return "not an image", orientation
    except Exception as e:  # permissions, a directory, a header PIL cannot parse
        return f"unreadable: {type(e).__name__}: {' '.join(str(e).split())}", orientation  # one line
    upright = (w, h) if orientation < 5 else (h, w)  # EXIF 5-8 swap width and height
    read, other = (upright, (w, h)) if exif else ((w, h), upright)
    H, W = size
    if read == (W, H):
        return None, orientation
    if other == (W, H):  # the annotations fit the other reading
        hint = ("annotated as stored, ignoring its EXIF orientation? use --raw-orientation" if exif else
                "annotated upright (EXIF orientation applied)? use --no-raw-orientation")
        return (f"is {read[0]}x{read[1]} with EXIF orientation {orientation} {'applied' if exif else 'ignored'}, "
                f"the annotations say {W}x{H}: {hint}"), orientation
    return f"is {read[0]}x{read[1]} but the annotations say {W}x{H}", orientation


def _check_piece(piece):
    """_inspect of the images lo:hi of the forked check (check_images)."""
    lo, hi = piece
    return [_inspect(path, size, FORKED["exif"]) for path, size in zip(FORKED["paths"][lo:hi], FORKED["sizes"][lo:hi])]


# ----------------------------------------------------------------------------- work in processes

FORKED = {}  # what the processes of in_processes read, set before they are forked (nothing is copied)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _process_of_the_main_one(parent):
    """Initializer of in_processes' processes: Ctrl-C and SIGTERM (which a terminal or a scheduler
    sends to every process of the job) are the main process's to handle, and it kills these; and
    each ends with the main process however that one ends (kill -9, the out-of-memory killer):
    Linux's parent-death signal, where there is one. The signals were blocked across the fork (a
    Ctrl-C then would have raised here, in the main process's handler) and come unblocked, ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # gone before that
        os._exit(1)


def in_processes(fn, tasks, workers, shared, on_done=None):
    """[fn(task) for task in tasks], in `workers` processes forked from this one (started in the
    order of `tasks`), which read `shared`, put in FORKED, without a copy (the image check, COCO's
    evaluation: Python loops that one core would run for a minute at COCO's scale); in this process
    where workers is 1 or the system cannot fork. on_done(n, count): after task n, the count-th to
    finish (a progress line). A stop (Ctrl-C, SIGTERM) or a process killed ends the others at once:
    nothing is waited for."""
    FORKED.update(shared)
    try:
        if workers <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            results = []
            for n, task in enumerate(tasks):
                results.append(fn(task))
                if on_done:
                    on_done(n, n + 1)
            return results
        results = [None] * len(tasks)
        gc.freeze()  # the objects so far are left alone by the processes' garbage collection, whose
        # visits would copy every page of them into each process (and reach CUDA tensors)
        pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), initializer=_process_of_the_main_one,
                                                      initargs=(os.getpid(),), mp_context=multiprocessing.get_context("fork"))
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:  # the first submit forks every process
                futures = {pool.submit(fn, task): n for n, task in enumerate(tasks)}
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
                results[futures[future]] = future.result()
                if on_done:
                    on_done(futures[future], count)
        except BaseException:  # a stop, or a process gone: the others' results are not wanted
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()  # SIGKILL: they ignore SIGTERM, which is what the pool would send
            raise
        finally:
            pool.shutdown(cancel_futures=True)
            gc.unfreeze()
        return results
    finally:
        FORKED.clear()


def format_eta(seconds):
    """12m05s, or 3h07m from an hour on."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# the progress shown last: (what, start) of the task, whether a line is open on a terminal, and
# off a terminal the last tenth of the work printed
_progress = {"task": None, "open": False, "tenths": -1}


def progress_line(what, done, total, start, rate_from=None):
    """Progress on stdout (stderr stays free for a one-line error): done/total, rate, ETA. On a
    terminal, one line redrawn with \r; in a log file, a line per tenth of the work instead of
    one line of thousands of \r updates, from the first second on (a shorter task shows only the
    line of end_progress_line). rate_from: (time, done) from which the rate and the ETA are
    measured, leaving out a slow start (a compilation); by default the task's start, 0 done."""
    elapsed = max(time.time() - start, 1e-9)
    since, done_then = rate_from or (start, 0)
    rate = (done - done_then) / max(time.time() - since, 1e-9)
    eta = format_eta((total - done) / rate) if rate > 0 else "?"
    text = f"{what}: {done}/{total}  {f'{rate:.1f}' if done > done_then else '?'}/s  eta {eta}"
    if _progress["task"] != (what, start):
        _progress.update(task=(what, start), tenths=-1)
    if sys.stdout.isatty():
        print(f"\r{text}   ", end="", flush=True)
        _progress["open"] = True
    elif elapsed >= 1 and 10 * done // max(total, 1) > _progress["tenths"]:
        print(text, flush=True)
        _progress["tenths"] = 10 * done // max(total, 1)


def end_progress_line(text=""):
    """Ends the progress line open on a terminal with `text` and a newline, so that what is printed
    next, an error or "interrupted" included, starts a line of its own; in a log file, prints
    `text` after the task's name. Nothing when no progress was shown."""
    if _progress["open"]:
        print(text, flush=True)
    elif _progress["task"] is not None and text:
        print(f"{_progress['task'][0]}:{text}", flush=True)
    _progress.update(task=None, open=False)


def check_images(paths, sizes, exif=True, workers=None, show_progress=True, what="checking images"):
    """Open every image's header (size, EXIF orientation) and read its last bytes (_check_one:
    only a JPEG or PNG that does not end as a complete file is decoded), in parallel processes
    (header parsing is Python: threads would share one core), with a progress line.
    sizes: the annotations' (h, w) of each path. Raises one DataError naming the first few
    images that are missing, unreadable, cut short, not images, or not of their annotated size,
    and the total count. An image broken in its middle still fails at decode, with its name."""
    n = len(paths)
    workers = min(workers or available_cpus(), max(1, n // 500))  # a pool only pays from ~1000 images
    chunk = max(1, min(1000, math.ceil(n / (workers * 8))))  # several chunks per process: a live progress line
    start, images_done = time.time(), 0
    pieces = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]

    def progress(k, count):
        nonlocal images_done
        images_done += pieces[k][1] - pieces[k][0]
        if show_progress:
            progress_line(what, images_done, n, start)

    results = in_processes(_check_piece, pieces, workers, {"paths": paths, "sizes": sizes, "exif": exif}, progress)
    checked = [answer for piece in results for answer in piece]  # (reason or None, EXIF orientation) of each image
    end_progress_line(f" done in {time.time() - start:.1f} s")
    bad = [(path, reason) for path, (reason, _) in zip(paths, checked) if reason is not None]
    if bad:
        shown = ", ".join(f"{path} ({reason})" for path, reason in bad[:5])
        more = f", ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} of {n} images cannot be used: {shown}{more}")
    # A mirrored or upside-down image (EXIF 2-4), or a square one turned by 90 degrees, has the
    # same size either way: the check cannot tell which way it was annotated, so say they exist
    turned = sum(orientation != 1 for _, orientation in checked)
    if turned and exif:
        print(f"note: {turned} of {n} images are stored turned or mirrored (an EXIF orientation) and are read "
              f"upright, as labelling tools show them; if their boxes were drawn on the stored pixels, use "
              f"--raw-orientation", flush=True)


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-layout dataset: `root/annotations/instances_<split>.json`, images in `root/<split>/`
    (see split_files for COCO's test sets). `annotated` is False for a file without annotations, a
    list of images to detect on (train=False only: there is nothing to train on).

    Labels are contiguous 0..K-1 in the order of the sorted category ids (`categories[k]` is the
    dataset's own category of label k; it travels with the model so results map back), or those of
    `categories` when given (evaluation: the model's, of which the file may hold a part). Boxes are
    COCO [x, y, w, h] -> xyxy, clipped to the image; crowd regions and boxes under 1 px wide or
    high after clipping never reach the loss. train=True keeps only images with at least one
    usable box (its header check, check_images, still opens every image listed); train=False
    keeps every image (evaluation); `tiny_boxes` and `images_without_boxes`
    count what the loss never sees (crowd regions aside), `unseen_categories` names the classes
    without a usable box ("id:name"), `shared_names` the categories whose name another one has too
    (told apart by id only, in the tables and pictures). Images are read upright (EXIF
    orientation applied, as labelling tools show them) unless exif=False.

    dataset[i] -> (image [3, h, w] uint8 RGB at the original size, target);
    dataset[(i, min_size, flip)] -> the image flipped horizontally if flip, still at its original
    size and uint8 (the training step resizes it on the device, see to_device), with the target
    of the image resized to shorter side min_size (longer at most max_size) and flipped. With
    `resize_in_worker = True` the image comes instead as model.prepare_image makes it: float32,
    normalised and resized (cheaper on a CPU-only machine, where the "device" is the CPU the
    training step also needs). target = {"boxes" [G, 4] float32 xyxy in the pixels of the image
    the network sees, "labels" [G] int64, "image_id", "orig_size" (h, w), "size" (h', w')}.

    Memory: after construction the dataset holds a few flat numpy arrays (boxes, labels, file
    names, sizes, ids) and no parsed JSON or pycocotools index. DataLoader workers are forked
    copies of this object; Python objects there get their reference counts written as workers
    touch them, which copies their memory pages into every worker of every rank, while numpy
    buffers stay shared. pycocotools' COCO (`.coco`) is built only when evaluation asks for it.
    """

    def __init__(self, root, split, train, max_size=1333, exif=True, categories=None):
        if not os.path.exists(root):
            raise DataError(f"data root not found: {root}")
        if not os.path.isdir(root):
            raise DataError(f"data root is not a directory: {root}")
        self.root, self.split, self.train, self.max_size, self.exif = root, split, train, max_size, exif
        self.resize_in_worker = False
        self.ann_file, self.img_dir = split_files(root, split)
        self._coco = None
        coco, self.annotated = _load_annotations(self.ann_file)
        if not coco["images"]:
            raise DataError(f"{self.ann_file}: the 'images' list is empty")
        if train and not self.annotated:
            raise DataError(f"{self.ann_file} has no 'annotations' list: a list of images to detect on, such as "
                            f"COCO's test-dev, has nothing to train on")

        # Every listed image must exist: say so now, naming all of them, not hours into a run.
        if not os.path.isdir(self.img_dir):
            raise DataError(f"image folder not found: {self.img_dir} (images of {self.ann_file})")
        present = set(os.listdir(self.img_dir))
        listed = [im["file_name"] for im in coco["images"]]
        missing = []
        for im in coco["images"]:
            name = im["file_name"]
            if name in present or os.path.isfile(os.path.join(self.img_dir, name)):
                continue
            # the same name in the other Unicode form: a copy made on macOS stores "café" as
            # "cafe" + a combining accent (NFD), which looks the same and is another file name
            other = [v for v in (unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name))
                     if v != name and os.path.isfile(os.path.join(self.img_dir, v))]
            if other:
                im["file_name"] = other[0]
            else:
                missing.append(name)
        del present
        if missing:
            raise DataError(f"{len(missing)} image(s) listed in {self.ann_file} are missing from "
                            f"{self.img_dir}: {_name_some(missing)}")
        # One file under two spellings ("a.jpg", "./a.jpg" and "../<split>/a.jpg", or its name in both Unicode forms) is
        # one image listed twice, as two entries of the same name are (_load_annotations)
        spellings = {}
        for im, name in zip(coco["images"], listed):
            spellings.setdefault(os.path.normpath(os.path.join(self.img_dir, im["file_name"])), []).append(name)
        twice = [" and ".join(names) + (" (one name in two Unicode forms)"
                                        if len({unicodedata.normalize("NFC", n) for n in names}) == 1 else "")
                 for names in spellings.values() if len(names) > 1]
        if twice:
            raise DataError(f"{self.ann_file}: file names {_name_some(twice)} name the same file under more "
                            f"than one image id (one entry per image, holding all its annotations)")

        self.categories = [{"id": c["id"], "name": c["name"]}
                           for c in sorted(coco["categories"], key=lambda c: c["id"])]
        named = Counter(c["name"] for c in self.categories)
        self.shared_names = [f"{c['id']}:{c['name']}" for c in self.categories if named[c["name"]] > 1]
        self.category_note = None  # for evaluate.py to print
        if categories is not None:  # a trained model's labels, of which the file may hold a part
            known = {(c["id"], c["name"]) for c in categories}
            annotated_ids = {a["category_id"] for a in coco["annotations"]}
            unknown = [c for c in self.categories if (c["id"], c["name"]) not in known]
            strangers = [f"{c['id']}:{c['name']}" for c in unknown if c["id"] in annotated_ids]
            # a label list exported whole, without objects of those classes: nothing for AP to count
            unannotated = [f"{c['id']}:{c['name']}" for c in unknown if c["id"] not in annotated_ids]
            if unannotated:
                self.category_note = (f"{self.ann_file} also lists categories the model was not trained on"
                                      f"{', without any annotation' if self.annotated else ''} "
                                      f"({_name_some(unannotated, 8)}): "
                                      f"{'they do not count in AP' if self.annotated else 'they are not detected'}")
            if strangers:
                trained = [f"{c['id']}:{c['name']}" for c in categories]
                raise DataError(f"{self.ann_file} holds categories the model was not trained on "
                                f"({_name_some(strangers, 8)}); it was trained on {_name_some(trained, 8)}")
            self.categories = [{"id": c["id"], "name": c["name"]} for c in categories]
        # the labels of the categories the file lists (all of them, unless given a model's labels):
        # what COCO's AP averages over, and the classes evaluate.py detects
        in_file = {(c["id"], c["name"]) for c in coco["categories"]}
        self.listed_labels = np.array([k for k, c in enumerate(self.categories) if (c["id"], c["name"]) in in_file],
                                      dtype=np.int64)  # [K']
        if len(self.listed_labels) == 0:  # nothing to detect, nothing for AP to count
            trained = [f"{c['id']}:{c['name']}" for c in self.categories]
            raise DataError(f"{self.ann_file} lists none of the categories the model was trained on "
                            f"({_name_some(trained, 8)})")
        label_of = {c["id"]: k for k, c in enumerate(self.categories)}

        # Usable boxes of every image in flat arrays: image i owns rows offsets[i]:offsets[i+1].
        images, anns = coco.pop("images"), coco.pop("annotations")
        del coco
        ann_id = np.array([a["id"] for a in anns], dtype=np.int64)  # [M]
        ann_image = np.array([a["image_id"] for a in anns], dtype=np.int64)  # [M]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)  # [M, 4]
        crowd = np.array([a["iscrowd"] for a in anns], dtype=bool)  # [M]
        ann_label = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)  # [M]
        del anns
        image_id = np.array([im["id"] for im in images], dtype=np.int64)  # [N]
        wh = np.array([(int(im["width"]), int(im["height"])) for im in images], dtype=np.int64)  # [N, 2]
        names = [im["file_name"] for im in images]
        del images

        owner = np.searchsorted(np.sort(image_id), ann_image)  # rank of each annotation's image id
        owner = np.argsort(image_id, kind="stable")[owner]  # [M] row of its image in `images`
        w, h = wh[owner, 0], wh[owner, 1]  # [M]
        x1 = np.minimum(np.maximum(xywh[:, 0], 0), w)
        y1 = np.minimum(np.maximum(xywh[:, 1], 0), h)
        x2 = np.minimum(np.maximum(xywh[:, 0] + xywh[:, 2], 0), w)
        y2 = np.minimum(np.maximum(xywh[:, 1] + xywh[:, 3], 0), h)
        usable = ~crowd & (x2 - x1 >= 1) & (y2 - y1 >= 1)  # [M]
        count = np.bincount(owner[usable], minlength=len(image_id))  # [N] usable boxes per image
        keep = np.flatnonzero(count > 0) if train else np.arange(len(image_id))  # [N'] in file order
        # what the loss never sees, for train.py to say: boxes under 1 px, images left without a box
        self.tiny_boxes = int((~crowd & ~usable).sum())
        # boxes clipped by more than a pixel: a few are normal, most mean [x1, y1, x2, y2] stored as [x, y, w, h]
        self.boxes_past_border = int((~crowd & ((xywh[:, 0] < -1) | (xywh[:, 1] < -1) | (xywh[:, 0] + xywh[:, 2] > w + 1)
                                                | (xywh[:, 1] + xywh[:, 3] > h + 1))).sum())
        self.num_boxes = int((~crowd).sum())
        # objects of zero width or height as annotated: COCOeval's IoU of such a box is 0, it can
        # never be matched (evaluate.py says so, for the images it evaluates)
        zero_area = ~crowd & ((xywh[:, 2] == 0) | (xywh[:, 3] == 0))  # [M]
        self.zero_area_ids, self.zero_area_image_ids = ann_id[zero_area], ann_image[zero_area]  # [Z], [Z]
        self.images_without_boxes = int((count == 0).sum())
        # classes without a usable box here ("id:name"): trained, they only ever learn "not me"
        seen = set(np.unique(ann_label[usable]).tolist())
        self.unseen_categories = [f"{c['id']}:{c['name']}" for k, c in enumerate(self.categories) if k not in seen]
        if len(keep) == 0:
            raise DataError(f"{self.ann_file}: no image has a usable box (not crowd, at least "
                            f"1 px wide and high): nothing to train on")
        # rows sorted by (image's position in the file, annotation's position in the file)
        rows = np.flatnonzero(usable)
        rows = rows[np.argsort(owner[rows], kind="stable")]
        self._boxes = np.stack((x1, y1, x2, y2), axis=1)[rows].astype(np.float32)  # [sum G, 4]
        self._labels = ann_label[rows]  # [sum G]
        starts = np.concatenate(([0], np.cumsum(count)))  # [N + 1] over all images
        self._first, self._count = starts[keep], count[keep]  # [N'], [N']
        self._image_ids = image_id[keep]  # [N']
        # every listed image, in file order, also those that training leaves out: the header check
        # opens them all (a size other than annotated may be why an image has no usable box)
        self._rows = keep  # [N'] the row of each of the dataset's images among the listed ones
        self._listed_sizes = np.ascontiguousarray(wh[:, ::-1])  # [N, 2] (h, w)
        self._sizes = self._listed_sizes[keep]  # [N', 2]
        # file names: one utf-8 buffer and offsets (a numpy array of Python strings would hold
        # objects); surrogateescape keeps names that are not utf-8 on disk, as json.dump(os.listdir())
        # writes them, byte for byte
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        self._name_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # [total bytes]
        self._name_ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)  # [N]
        del names, encoded

    def __len__(self):
        return len(self._image_ids)

    @property
    def image_ids(self):
        """The dataset's own image ids, in index order (a fresh list)."""
        return self._image_ids.tolist()

    @property
    def fingerprint(self):
        """A digest of what training reads of the annotation file (image ids, sizes and file names,
        the usable boxes and their labels): last.pt keeps it, so that --resume can tell that the
        annotations changed under the same path."""
        digest = hashlib.sha256()
        for a in (self._image_ids, self._sizes, self._count, self._boxes, self._labels, self._name_bytes, self._name_ends):
            digest.update(np.ascontiguousarray(a).tobytes())
        return digest.hexdigest()[:16]

    @property
    def aspect_ratios(self):
        """Width / height of every image, in index order (a fresh list)."""
        return (self._sizes[:, 1] / self._sizes[:, 0]).tolist()

    @property
    def coco(self):
        """pycocotools' COCO of the annotation file, for evaluation: built on first use, never
        by training (see the class docstring on memory)."""
        if self._coco is None:
            self._coco = coco_ground_truth(self.ann_file)
        return self._coco

    def _listed_name(self, row):
        """The file name of the image in row `row` of the file's list of images."""
        lo = self._name_ends[row - 1] if row > 0 else 0
        return self._name_bytes[lo:self._name_ends[row]].tobytes().decode("utf-8", "surrogateescape")

    def file_name(self, i):
        return self._listed_name(self._rows[i])

    def path(self, i):
        return os.path.join(self.img_dir, self.file_name(i))

    def padded_shape(self, keys):
        """(H, W) of a batch of these TrainSampler keys (index, min_size, flip) once collate and
        to_device have padded it: its largest resized image, rounded up to a multiple of 32.
        From the annotated sizes, without reading an image."""
        sizes = [resized_size(tuple(self._sizes[i].tolist()), min_size, self.max_size) for i, min_size, _ in keys]
        return _padded(max(h for h, _ in sizes)), _padded(max(w for _, w in sizes))

    def check_images(self, workers=None, show_progress=True, count=None):
        """Header check (see check_images) before training or evaluation of every image the file
        lists, those that training leaves out for want of a usable box included, or of the
        dataset's first `count` images."""
        rows = np.arange(len(self._listed_sizes)) if count is None else self._rows[:count]
        paths = [os.path.join(self.img_dir, self._listed_name(row)) for row in rows]
        check_images(paths, self._listed_sizes[rows].tolist(), self.exif, workers, show_progress)

    def read_image(self, i):
        """The i-th image as uint8 [3, h, w] RGB, upright unless exif=False; any PIL mode becomes RGB."""
        path = self.path(i)
        image = read_image(path, self.exif)  # [h, w, 3]
        if image.shape[:2] != tuple(self._sizes[i]):  # only unchecked (--skip-check): the check's words
            (h, w), (H, W) = image.shape[:2], self._sizes[i]
            problem = _check_one(path, (H, W), self.exif) or f"is {w}x{h} but the annotations say {W}x{H}"
            raise ImageError(f"image {path} {problem} ({self.ann_file})")
        return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))  # [3, h, w]  one copy, writable

    def __getitem__(self, key):
        i, min_size, flip = key if isinstance(key, tuple) else (key, None, False)
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        image = self.read_image(i)  # [3, h, w] uint8
        orig_size = tuple(image.shape[-2:])
        lo = self._first[i]
        boxes = torch.from_numpy(self._boxes[lo:lo + self._count[i]].copy())  # [G, 4]
        labels = torch.from_numpy(self._labels[lo:lo + self._count[i]].copy())  # [G]
        size = orig_size if min_size is None else resized_size(orig_size, min_size, self.max_size)
        boxes = resize_boxes(boxes, orig_size, size)  # [G, 4]
        if flip:  # at the original size: bilinear resizing commutes with a mirror (same sample grid)
            image = image.flip(-1)
            boxes = flip_boxes(boxes, size[1])
        if self.resize_in_worker:  # on 1 thread, as in a DataLoader worker: bilinear resizing on the CPU
            # rounds differently with the number of threads, and --workers 0 must give the same batches
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                image = prepare_image(image, size)  # [3, h', w'] float32, normalised
            finally:
                torch.set_num_threads(threads)
        target = {"boxes": boxes, "labels": labels, "image_id": int(self._image_ids[i]),
                  "orig_size": orig_size, "size": size}
        return image, target


def coco_ground_truth(ann_file):
    """pycocotools' COCO of a (validated) annotation file, for COCOeval; its index printout silenced.

    Annotation ids are renumbered 1..M: COCOeval records a detection's match by the matched ground
    truth's id and reads id 0 as "unmatched", so a dataset whose ids start at 0 would lose a true
    positive. Nothing reports annotation ids."""
    from pycocotools.coco import COCO
    dataset, _ = _load_annotations(ann_file)
    for k, a in enumerate(dataset["annotations"]):
        a["id"] = k + 1
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _to_rgb(img, file_format=None):
    """PIL image of any mode -> uint8 numpy [h, w, 3], read-only for an RGB image (a view of the
    bytes PIL copies its pixels into). file_format: the format of the file it was read from
    (img.format, which a transposed image has lost)."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # 16-bit / integer / float grey: PIL's convert("RGB") would clip at 255, so rescale by the
        # value of white. 65535 where the file says 16 bits: modes I;16..., and mode I from PNG or
        # PGM/PPM (which PIL reads as mode I, scaled to 16 bits), whatever the pixels are. Where it
        # does not (32-bit integers, floats, as in TIFF), a guess from the pixels: 65535 above 255,
        # 1 for floats within [0, 1], else 255.
        a = np.asarray(img, dtype=np.float64)
        sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and (file_format or img.format) in ("PNG", "PPM"))
        top = 65535.0 if sixteen_bit or a.max(initial=0) > 255 else 255.0
        if img.mode == "F" and a.max(initial=0) <= 1:  # float images in [0, 1]
            top = 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    # an RGB image (most JPEGs) as it is: convert("RGB") and np.array would each copy it once more,
    # which at 1333x800 took twice the decode's time
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def collate(batch):
    """[(image [3, h_i, w_i], target)] -> (images [B, 3, H, W], [target]): the images as the
    dataset made them (uint8 at original size, or float prepared in the worker) zero-padded to
    the largest one rounded up to a multiple of 32, in one tensor that pins and copies to the
    device in one piece (a uint8 batch is a quarter of float32's bytes through shared and pinned
    memory); each target keeps its image's "orig_size" and "size"."""
    return batch_images([image for image, _ in batch]), [target for _, target in batch]


def pad_targets(boxes, labels, multiple):
    """Lists of B host tensors, boxes [G_b, 4] and labels [G_b] -> boxes [B, G, 4] and labels [B, G]
    (-1 at the padding), G the largest G_b rounded up to `multiple` (at least `multiple`)."""
    G = -(-max(1, *(len(l) for l in labels)) // multiple) * multiple
    padded_boxes = torch.zeros(len(boxes), G, 4)  # [B, G, 4]
    padded_labels = torch.full((len(labels), G), -1, dtype=torch.long)  # [B, G]
    for b, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        padded_boxes[b, :len(image_boxes)], padded_labels[b, :len(image_labels)] = image_boxes, image_labels
    return padded_boxes, padded_labels


def to_device(batch, device, pad_to=None):
    """A loader batch (collate) -> (images [B, 3, H, W] float32 normalised and zero-padded to a
    multiple of 32, gt_boxes [[G_b, 4]], gt_labels [[G_b]]) on `device`. Copies are non-blocking
    (from pinned memory when the DataLoader pins). A uint8 batch is cut back into its images,
    which model.preprocess turns into floats, normalises, resizes to each target's "size" and
    pads on the device: the very function RetinaNet.detect uses. A float batch was prepared in
    the workers by model.prepare_image (the same code): it only moves.

    pad_to: the objects come as two padded tensors instead of lists, gt_boxes [B, G, 4] and
    gt_labels [B, G] with label -1 at the padding, G the largest count rounded up to a multiple of
    pad_to (train.py: 8). The losses take both forms; this one is two copies instead of 2 B, and
    torch.compile sees a shape that changes rarely and never drops to 0 or 1 (sizes it would
    specialise on, compiling again for each such batch)."""
    images, targets = batch
    images = images.to(device, non_blocking=True)  # [B, 3, H, W]
    if pad_to:
        boxes, labels = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], pad_to)
        gt_boxes, gt_labels = host_to_device(boxes, device), host_to_device(labels, device)
    else:
        gt_boxes = [t["boxes"].to(device, non_blocking=True) for t in targets]  # [[G_b, 4]]
        gt_labels = [t["labels"].to(device, non_blocking=True) for t in targets]  # [[G_b]]
    if images.dtype == torch.uint8:
        cut = [images[b, :, :h, :w] for b, (h, w) in enumerate(t["orig_size"] for t in targets)]
        images, _ = preprocess(cut, [t["size"] for t in targets])  # [B, 3, H', W']
    return images, gt_boxes, gt_labels


def _padded(side):
    """An image side once padded, as model.batch_images pads: rounded up to a multiple of 32."""
    return -(-side // SIZE_DIVISIBLE) * SIZE_DIVISIBLE


def canvas_shapes(min_sizes, max_size):
    """The padded shapes of train.py --fixed-shapes, smallest first: for each training scale s,
    (s', max_size) for landscape batches and (max_size, s') for portrait ones, s' = min(s,
    max_size), rounded up to a multiple of 32. An image resized at scale s has its shorter side
    <= s' and its longer <= max_size (model.resized_size), and TrainSampler never mixes
    orientations in a batch, so every batch fits its canvas: the network sees at most two shapes
    per scale."""
    shapes = {shape for s in min_sizes for shape in ((_padded(min(s, max_size)), _padded(max_size)),
                                                      (_padded(max_size), _padded(min(s, max_size))))}
    return sorted(shapes, key=lambda hw: (hw[0] * hw[1], hw))


def pad_to_canvas(images, canvases):
    """images [B, 3, H, W] -> [B, 3, H', W'] zero-padded at the bottom and right (as batch_images
    pads) to the smallest canvas of canvas_shapes that holds them; unchanged if none does."""
    H, W = images.shape[-2:]
    fits = [(h, w) for h, w in canvases if h >= H and w >= W]
    if not fits:
        return images
    h, w = fits[0]
    if (h, w) == (H, W):  # already that shape: no copy
        return images
    return torch.nn.functional.pad(images, (0, w - W, 0, h - H))  # [B, 3, h, w]


# ----------------------------------------------------------------------------- sampling

def _generator(seed, epoch, stream):
    """A torch.Generator that depends only on (seed, epoch, stream)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class TrainSampler:
    """Iteration-based batch sampler for DataLoader(batch_sampler=...).

    Iteration `it` (start_iter <= it < max_iter) yields rank `rank`'s contiguous share of global
    batch `it`: keys (index, min_size, flip). Epoch e walks torch.randperm seeded from (seed, e)
    and fills one batch per orientation group (landscape w >= h, portrait w < h), emitting a batch
    when it is full; each group's leftover at the end of the epoch is padded by wrapping around the
    group's own images, so every image is seen at least once per epoch and every batch has
    batch_size images of one orientation. min_size (uniform over min_sizes) and flip (p = 0.5)
    are drawn per key from a second generator seeded from (seed, e). Nothing depends on what came
    before, so start_iter=k yields exactly iterations k.. of an uninterrupted run, and
    1 rank x 2 images sees the same global batches as 2 ranks x 1 image.
    """

    def __init__(self, dataset, batch_size, min_sizes=(800,), flip=True, rank=0, world_size=1,
                 seed=0, start_iter=0, max_iter=90000):
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of "
                             f"world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        min_sizes = tuple(min_sizes)
        if not min_sizes or not all(float(s).is_integer() and s > 0 for s in min_sizes):
            raise ValueError(f"min_sizes must be positive integers, got {min_sizes}")
        min_sizes = tuple(int(s) for s in min_sizes)
        if not 0 <= start_iter <= max_iter:
            raise ValueError(f"need 0 <= start_iter ({start_iter}) <= max_iter ({max_iter})")
        if len(dataset) == 0:
            raise ValueError("TrainSampler needs a non-empty dataset")
        self.batch_size, self.min_sizes, self.flip = batch_size, min_sizes, flip
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_iter, self.max_iter = start_iter, max_iter
        self._landscape = [ar >= 1 for ar in dataset.aspect_ratios]
        n_land = sum(self._landscape)
        # Group sizes are fixed, so the batch count of an epoch does not depend on the shuffle.
        self.epoch_length = sum(math.ceil(n / batch_size) for n in (n_land, len(dataset) - n_land))
        self._cached = {}  # the last two epochs: the loader draws ahead of the step, which reads global_batch

    def __len__(self):
        return self.max_iter - self.start_iter

    def _epoch(self, epoch):
        """All global batches of `epoch`: [epoch_length][batch_size] keys (index, min_size, flip)."""
        if epoch in self._cached:
            return self._cached[epoch]
        bs = self.batch_size
        order = torch.randperm(len(self._landscape), generator=_generator(self.seed, epoch, "order"))
        buckets, seen, batches = [[], []], [[], []], []
        for i in order.tolist():
            g = 0 if self._landscape[i] else 1
            buckets[g].append(i)
            seen[g].append(i)
            if len(buckets[g]) == bs:
                batches.append(buckets[g])
                buckets[g] = []
        for g in (0, 1):  # leftovers: wrap around the group's own images of this epoch
            if buckets[g]:
                batches.append(buckets[g] + [seen[g][k % len(seen[g])] for k in range(bs - len(buckets[g]))])
        assert len(batches) == self.epoch_length
        aug = _generator(self.seed, epoch, "augment")
        size_idx = torch.randint(len(self.min_sizes), (len(batches), bs), generator=aug)  # [L, bs]
        flips = (torch.rand((len(batches), bs), generator=aug) < 0.5) & self.flip  # [L, bs]
        keys = [[(i, self.min_sizes[s], f) for i, s, f in zip(b, size_idx[t].tolist(), flips[t].tolist())]
                for t, b in enumerate(batches)]
        self._cached = {e: k for e, k in self._cached.items() if e == epoch - 1}
        self._cached[epoch] = keys
        return keys

    def global_batch(self, it):
        """Keys of global batch `it` (all ranks together)."""
        epoch, t = divmod(it, self.epoch_length)
        return self._epoch(epoch)[t]

    def __iter__(self):
        share = self.batch_size // self.world_size
        for it in range(self.start_iter, self.max_iter):
            yield self.global_batch(it)[self.rank * share:(self.rank + 1) * share]


# ----------------------------------------------------------------------------- shapes

# (category id, name): non-contiguous ids on purpose, to exercise the label <-> id mapping.
SHAPES_CATEGORIES = ((1, "square"), (3, "disk"), (4, "triangle"), (7, "bar"), (9, "needle"))
SHAPES_SQUARE = ("square", "disk")  # boxes of aspect ~1
SHAPES_SLENDER = ("bar", "needle")  # boxes ~1:5 and ~1:8 (to 1:12), mostly horizontal or vertical
SHAPES_IMAGE_SIZES = ((320, 256), (320, 320), (384, 288), (256, 320), (288, 384))  # (w, h)
SHAPES_CROWDED_SHARE = 0.18  # images with 20-35 overlapping objects; the rest have 1-8
_SHAPES_VERSION = 1  # bump when the generator changes, so old copies get rebuilt
_SHAPES_MARKER = "COMPLETE"  # written last: a folder without it is incomplete


def _shape_geometry(rng, name, crowded):
    """One object around the origin: ("polygon", [(x, y), ...]) or ("disk", radius), and its
    extent (x0, y0, x1, y1) relative to the origin (the exact box comes from the raster)."""
    small = 0.55 if crowded else 1.0  # crowded images hold smaller objects
    if name == "disk":
        r = rng.uniform(7, 50 * small)
        return ("disk", r), (-r, -r, r, r)
    if name == "square":
        s = rng.uniform(14, 86 * small)
        angle = 0.0 if rng.random() < 0.5 else rng.uniform(0, math.pi / 2)
        corners = [(-s / 2, -s / 2), (s / 2, -s / 2), (s / 2, s / 2), (-s / 2, s / 2)]
    elif name == "triangle":
        r = rng.uniform(10, 55 * small)  # circumradius of an equilateral triangle
        angle = rng.uniform(0, 2 * math.pi)
        corners = [(r * math.cos(2 * math.pi * k / 3), r * math.sin(2 * math.pi * k / 3)) for k in range(3)]
    else:  # bar ~1:5, needle ~1:8 and thinner: horizontal or vertical, a few slightly tilted
        length = rng.uniform(36, 120 * (0.65 if crowded else 1.0))
        thick = length / (rng.uniform(5, 6) if name == "bar" else rng.uniform(9, 13))  # raster adds ~1 px
        thick = max(thick, 2.5)  # stay visible through the noise
        angle = 0.0 if rng.random() < 0.5 else math.pi / 2
        if rng.random() < 0.15:
            angle += rng.uniform(-0.1, 0.1)  # up to ~6 degrees: the box stays slender
        corners = [(-length / 2, -thick / 2), (length / 2, -thick / 2), (length / 2, thick / 2),
                   (-length / 2, thick / 2)]
    c, s = math.cos(angle), math.sin(angle)
    poly = [(x * c - y * s, x * s + y * c) for x, y in corners]
    xs, ys = [x for x, _ in poly], [y for _, y in poly]
    return ("polygon", poly), (min(xs), min(ys), max(xs), max(ys))


def _paint_shape(img, geometry, extent, cx, cy, fill, outline):
    """Paint a shape centred at (cx, cy) into `img`; returns its exact pixel box (x1, y1, x2, y2)
    (tight around the painted pixels, continuous coordinates: pixel k spans [k, k+1]) and area.

    The shape is rasterised into its own mask first, so the box is what was drawn, to the pixel.
    """
    kind, g = geometry
    x0, y0, x1, y1 = extent
    ox, oy = max(int(cx + x0) - 2, 0), max(int(cy + y0) - 2, 0)  # mask window around the shape
    mask = Image.new("L", (min(int(cx + x1) + 3, img.width) - ox, min(int(cy + y1) + 3, img.height) - oy))
    draw, x, y = ImageDraw.Draw(mask), cx - ox - 0.5, cy - oy - 0.5  # -0.5: PIL's pixel centres
    if kind == "disk":
        draw.ellipse((x - g, y - g, x + g, y + g), fill=255, outline=128 if outline else None)
    else:
        draw.polygon([(x + px, y + py) for px, py in g], fill=255, outline=128 if outline else None)
    m = np.asarray(mask)  # [h_m, w_m]
    img.paste(fill, (ox, oy), Image.fromarray(((m > 0) * 255).astype(np.uint8)))
    if outline:
        img.paste(outline, (ox, oy), Image.fromarray(((m == 128) * 255).astype(np.uint8)))
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    box = (ox + int(cols[0]), oy + int(rows[0]), ox + int(cols[-1]) + 1, oy + int(rows[-1]) + 1)
    return box, int((m > 0).sum())


def _hsv_to_rgb(h, s, v):
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]
    return int(r * 255), int(g * 255), int(b * 255)


def _render_shapes_image(rng, noise_bank):
    """One synthetic image: (PIL RGB image, [(category index, (x, y, w, h), area)])."""
    w, h = SHAPES_IMAGE_SIZES[rng.integers(len(SHAPES_IMAGE_SIZES))]
    crowded = rng.random() < SHAPES_CROWDED_SHARE
    count = int(rng.integers(20, 36) if crowded else rng.integers(1, 9))

    # Background: a linear gradient between two muted colours with blurred blobs, painted at a
    # quarter of the resolution and upsampled (it is smooth anyway, and 16x cheaper), then noise.
    sw, sh = w // 4, h // 4
    c0, c1 = rng.uniform(30, 170, 3), rng.uniform(30, 170, 3)
    theta = rng.uniform(0, 2 * math.pi)
    t = np.arange(sw)[None, :] * math.cos(theta) + np.arange(sh)[:, None] * math.sin(theta)  # [sh, sw]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    small = Image.fromarray((c0 + (c1 - c0) * t[:, :, None]).astype(np.uint8))  # [sh, sw, 3]
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(3, 9))):
        bx, by, rx, ry = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(4, 22), rng.uniform(4, 22)
        base = small.getpixel((min(int(bx), sw - 1), min(int(by), sh - 1)))
        tint = tuple(min(max(int(v + d), 0), 255) for v, d in zip(base, rng.uniform(-45, 45, 3)))
        draw.ellipse((bx - rx, by - ry, bx + rx, by + ry), fill=tint)
    small = small.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 2.2))))
    img = small.resize((w, h), Image.BILINEAR)
    background = np.asarray(img)  # [h, w, 3], to keep objects visible against it

    # Objects: crowded images cluster them around a few centres so that they overlap; elsewhere
    # they barely touch. Either way none hides most of another (objects stay clearly visible).
    centres = [(rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h)
               for _ in range(int(rng.integers(1, 4)))]
    max_iou, max_cover = (0.45, 0.6) if crowded else (0.15, 0.3)
    placed, objects = [], []
    for _ in range(count):
        for _attempt in range(25):
            cat = int(rng.integers(len(SHAPES_CATEGORIES)))
            geometry, (x0, y0, x1, y1) = _shape_geometry(rng, SHAPES_CATEGORIES[cat][1], crowded)
            if x1 - x0 > w - 6 or y1 - y0 > h - 6:
                continue
            if crowded:
                ccx, ccy = centres[int(rng.integers(len(centres)))]
                cx, cy = rng.normal(ccx, 0.22 * w), rng.normal(ccy, 0.22 * h)
            else:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            cx, cy = min(max(cx, 3 - x0), w - 3 - x1), min(max(cy, 3 - y0), h - 3 - y1)  # inside
            if all(_overlap_ok((cx + x0, cy + y0, cx + x1, cy + y1), other, max_iou, max_cover)
                   for other in placed):
                break
        else:
            continue  # no room for this one
        hue = (cat / len(SHAPES_CATEGORIES) + rng.uniform(-0.22, 0.22)) % 1.0  # class-biased, overlapping
        fill = _hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0))
        local = background[int(cy), int(cx)].tolist()
        if sum(abs(a - b) for a, b in zip(fill, local)) < 150:  # too close to the background: go dark
            fill = tuple(int(v * 0.3) for v in fill)
        outline = tuple(int(v * 0.5) for v in fill) if rng.random() < 0.3 else None
        box, area = _paint_shape(img, geometry, (x0, y0, x1, y1), cx, cy, fill, outline)
        placed.append(box)
        objects.append((cat, (box[0], box[1], box[2] - box[0], box[3] - box[1]), area))

    # Gaussian noise over everything, cropped from a shared bank (drawing fresh noise per image
    # would dominate the generation time).
    sigma = rng.uniform(4, 12)
    oy, ox = int(rng.integers(noise_bank.shape[0] - h)), int(rng.integers(noise_bank.shape[1] - w))
    pixels = np.asarray(img, dtype=np.float32) + sigma * noise_bank[oy:oy + h, ox:ox + w]  # [h, w, 3]
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)), objects


def _overlap_ok(a, b, max_iou, max_cover):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter) <= max_iou and inter / min(area_a, area_b) <= max_cover


def _write_shapes_split(folder, split, num_images, first_id, seed, noise_bank):
    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    for k in range(num_images):
        rng = np.random.default_rng([seed, first_id + k])  # per image: order-independent
        img, objects = _render_shapes_image(rng, noise_bank)
        image_id = first_id + k
        file_name = f"{image_id:012d}.jpg"
        img.save(os.path.join(folder, split, file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
        for cat, (x, y, bw, bh), area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": SHAPES_CATEGORIES[cat][0],
                                "bbox": [x, y, bw, bh], "area": area, "iscrowd": 0})
    coco = {"info": {"description": "FreeAnchor synthetic shapes", "version": _SHAPES_VERSION},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in SHAPES_CATEGORIES]}
    with open(os.path.join(folder, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)


def _build_folder(prefix, parent):
    """A new folder `prefix`* in `parent` for a build of shapes, holding the file "owner": this
    machine's name and this process's id, by which a later build knows it abandoned (kill -9)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(path, "owner"), "w") as f:
        f.write(f"{os.uname().nodename} {os.getpid()}")
    return path


def _remove_abandoned_builds(parent):
    """Remove the build folders (_build_folder) in `parent` of processes of this machine that have
    ended: a build stopped by kill -9 leaves its folder (up to 115 MB) behind. Those of live
    processes (a concurrent build) and of other machines (a shared disk) stay."""
    for name in os.listdir(parent):
        if not name.startswith((".shapes-tmp-", ".shapes-stale-")):
            continue
        try:
            with open(os.path.join(parent, name, "owner")) as f:
                host, pid = f.read().split()
            if host != os.uname().nodename:
                continue
            os.kill(int(pid), 0)  # raises ProcessLookupError where the process has ended
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (OSError, ValueError):  # no owner file yet (a build just started), another user's process
            continue


def prepare_shapes(root="datasets/shapes", num_train=3000, num_val=300, seed=0):
    """Build the synthetic shapes dataset under `root` unless a complete copy with the same
    parameters is there; returns root. COCO layout with splits "train2017" and "val2017".

    Deterministic (every image from its own generator seeded by (seed, image id)) and atomic:
    written into a temporary folder next to `root`, marker file last, then renamed into place,
    so an interrupted build never looks complete and concurrent builders (DDP ranks) are safe.
    """
    params = {"version": _SHAPES_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed}
    marker = os.path.join(root, _SHAPES_MARKER)

    def complete():
        try:
            with open(marker) as f:
                return json.load(f) == params
        except (OSError, ValueError):
            return False

    if complete():
        return root
    if os.path.exists(root):  # replace only what can be an old or half-built copy of ours
        if not os.path.isdir(root):
            raise DataError(f"{root} exists but is not a shapes dataset (a file); move it away")
        strangers = set(os.listdir(root)) - {"annotations", "train2017", "val2017", _SHAPES_MARKER}
        if strangers:
            raise DataError(f"{root} exists but is not a shapes dataset (it holds "
                            f"{_name_some(sorted(strangers))}); move it away")

    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_builds(parent)
    print(f"shapes: generating {num_train} + {num_val} images in {root} (once) ...", end="", flush=True)
    start = time.time()
    _progress.update(task=("shapes", start), open=True)  # an error or Ctrl-C ends the line first
    tmp = _build_folder(".shapes-tmp-", parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        noise_bank = np.random.default_rng([seed, 0]).standard_normal((512, 512, 3), dtype=np.float32)
        _write_shapes_split(tmp, "train2017", num_train, 1, seed, noise_bank)
        _write_shapes_split(tmp, "val2017", num_val, 1_000_001, seed, noise_bank)
        with open(os.path.join(tmp, _SHAPES_MARKER), "w") as f:
            json.dump(params, f)
        os.remove(os.path.join(tmp, "owner"))  # not part of the dataset
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if os.path.exists(root) and not complete():  # stale copy: move it aside, then drop it
            stale = _build_folder(".shapes-stale-", parent)
            os.rename(root, os.path.join(stale, "old"))
            shutil.rmtree(stale)
        try:
            os.rename(tmp, root)
        except OSError:
            if not complete():  # another process renamed its own copy first: use that one
                raise
    except OSError as e:  # a full disk: a write's error names no file; say where it was building
        if e.filename is None:
            raise OSError(e.errno, e.strerror, root) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    end_progress_line(f" done in {time.time() - start:.0f} s")
    return root


# ----------------------------------------------------------------------------- shared by train.py and evaluate.py


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors (no usage block), printed once under torchrun."""

    def error(self, message):
        print_stop(f"error: {message} (--help lists the options)")
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default once: not where the help text already gives it or where
    there is none (None: resolved at run time, as the text says), and tuples as the values to type."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "(default" in (action.help or ""):
            return action.help
        if isinstance(action.default, tuple):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def add_config_arguments(parser, config, title):
    """One --flag per field of the dataclass `config`, in an argument group `title`; the field's
    metadata["help"] is the help text. bool fields get --flag / --no-flag (default None: "auto",
    resolved by the caller), tuple fields take one or more ints."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        kind = getattr(f.type, "__name__", f.type)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata["help"])
        elif kind == "tuple":
            group.add_argument(flag, type=int, nargs="+", default=f.default, help=f.metadata["help"])
        else:
            group.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=f.default,
                               help=f.metadata["help"])
    return parser


def config_from_args(config, args):
    """The dataclass `config` built from the matching entries of vars(parsed arguments)."""
    return config(**{f.name: args[f.name] for f in dataclasses.fields(config)})


def device_defaults(cfg):
    """The speed settings of a config with `device`, `amp` and `channels_last` (None: default):
    the device defaults to CUDA where there is one; bf16 autocast and channels_last default to on
    with CUDA only, on GPUs with native bfloat16 (channels_last pays with tensor-core convolutions,
    measured on an H200 in bf16; NCHW, torch's default, elsewhere). On a CPU neither pays for
    certain: channels_last measured within noise of NCHW on the quickstart, and bfloat16 is fast
    only on CPUs with native bf16 (1.68x on the quickstart). Where the processor emulates bfloat16
    (most CPUs; GPUs before compute capability 8.0, such as the V100 and T4) it is slower than
    float32: there the default is float32, and --amp falls back to it with a note. Raises
    ValueError for CUDA asked where there is none, or torchrun with more processes than GPUs."""
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]*))?", cfg.device):  # what torch.device takes
        raise ValueError(f"--device {cfg.device}: use cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available here (use --device cpu)")
    index = torch.device(cfg.device).index
    if cfg.device.startswith("cuda") and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {cfg.device}: there are {torch.cuda.device_count()} CUDA devices here")
    on_cuda = cfg.device.startswith("cuda")
    if on_cuda and "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: the GPU setup_processes picks
        index = torchrun_gpu(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    native_bf16 = gpu_has_native_bf16(index) if on_cuda else cpu_has_native_bf16()
    if cfg.channels_last is None:
        cfg.channels_last = on_cuda and native_bf16
    if cfg.amp is None:
        cfg.amp = on_cuda and native_bf16
    elif cfg.amp and not native_bf16:
        cfg.amp = False
        if os.environ.get("RANK", "0") == "0":  # said once under torchrun
            if on_cuda:
                major, minor = torch.cuda.get_device_capability(index)
                print(f"note: --amp ignored: this GPU ({torch.cuda.get_device_name(index)}, compute capability "
                      f"{major}.{minor}) has no native bfloat16 (8.0 or later), where float32 is faster", flush=True)
            else:
                print("note: --amp ignored: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where float32 "
                      "is faster", flush=True)
    return cfg


def torchrun_gpu(local_rank, local_world):
    """The GPU of torchrun's process `local_rank` of the `local_world` on this machine (LOCAL_RANK,
    LOCAL_WORLD_SIZE): that index, or 0 where CUDA_VISIBLE_DEVICES shows each process one GPU of
    its own (as cluster schedulers do). ValueError where the machine has fewer GPUs than processes:
    the same error in every process, so that the first one prints it."""
    count = torch.cuda.device_count()
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return 0
    processes = max(local_world, local_rank + 1)
    if processes > count:
        raise ValueError(f"{processes} processes on this machine but {count} GPU(s) visible to each: run one "
                         f"process per GPU (torchrun --nproc_per_node {count})")
    return local_rank


def gpu_has_native_bf16(index):
    """True on GPUs whose tensor cores run bfloat16: NVIDIA's from compute capability 8.0 (A100,
    H100, RTX 30xx on); under ROCm every AMD GPU, as torch.cuda.is_bf16_supported counts them
    (older ones, such as the MI50, emulate it). Older NVIDIA GPUs (V100 7.0, T4 7.5) compute it in
    float32 with conversions, and inductor does not compile bfloat16 for them. index None: the
    current device."""
    return torch.version.hip is not None or torch.cuda.get_device_capability(index) >= (8, 0)


def cpu_has_native_bf16():
    """True on x86 CPUs with bfloat16 instructions (AVX512-BF16 or AMX-BF16), where oneDNN runs
    bf16 convolutions faster than float32; elsewhere it emulates them, slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_threads(local_world):
    """Threads for each of `local_world` CPU processes of a torchrun job on this machine: the CPUs
    shared among them, or None where the user set OMP_NUM_THREADS (torch follows it). torchrun sets
    it to 1 itself for several processes where the user set none, which would idle the rest."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads and not (threads == "1" and local_world > 1):
        return None
    return max(1, available_cpus() // local_world)


def setup_processes(device):
    """torchrun or plain python -> (ddp, rank, world, device): under torchrun one process per GPU
    (torchrun_gpu's, NCCL) or CPU processes sharing the cores (gloo); otherwise (False, 0, 1, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if device.startswith("cuda:"):  # pinned memory and the loader's pinning thread use the current GPU
            torch.cuda.set_device(device)
        return False, 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.startswith("cuda"):
        device = f"cuda:{torchrun_gpu(local_rank, local_world)}"
        torch.cuda.set_device(device)
    elif (threads := cpu_threads(local_world)) is not None:
        torch.set_num_threads(threads)
    try:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    except getattr(torch.distributed, "DistNetworkError", ()) as e:  # rank 0 listens at MASTER_ADDR:MASTER_PORT
        # (taken by another program, say), the others connect there: one line, not "another process stopped"
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise OSError(f"the processes' rendezvous at {where} failed: {str(e).strip().splitlines()[0]}") from None
    return True, rank, world, device


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a cluster scheduler stopping or preempting the job) where catch_stop_signals
    is in force: the program stops as on Ctrl-C, after the file being written (signals_deferred)."""
    signum = signal.SIGTERM


_stops = 0  # Ctrl-C and SIGTERM received while catch_stop_signals is in force
_held_back = 0  # those received inside the signals_deferred blocks open now, nested ones included


def _stop(signum, frame):
    """The handler of Ctrl-C and SIGTERM (catch_stop_signals). The first one stops the program, by a
    KeyboardInterrupt or Terminated raised where it is. A second one is ignored: it would interrupt
    the stop itself (its message, the DataLoader workers' shutdown) with a traceback. A third one
    ends the process at once, which stays stoppable even where the first one was lost (raised
    inside a __del__, where Python only reports it); a checkpoint being written is then lost, the
    previous one kept (write_atomic)."""
    global _stops
    _stops += 1
    if _stops == 1:
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
    if _stops >= 3:
        _stop_at_once(signum)


def _stop_at_once(signum):
    if os.environ.get("RANK", "0") == "0":  # not print: a signal handler may interrupt a print
        os.write(2, b"stopped at once\n")
    os._exit(128 + signum)


def catch_stop_signals():
    """From here on, in the main thread, Ctrl-C raises KeyboardInterrupt (also where a caller had
    installed another handler) and SIGTERM raises Terminated, unless ignored (as `cmd &` in a script
    leaves SIGINT) or already handled; a second one is ignored, a third one ends the process at once
    (_stop). Returns a function that puts both back as they were."""
    global _stops, _held_back
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _stops = _held_back = 0
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _stop)
    if previous[signal.SIGTERM] is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop)

    def restore():
        global _stops, _held_back
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        _stops = _held_back = 0
    return restore


def signals_while_exiting():
    """For train.py and evaluate.py run as programs, once main() is done or stopping: the exit takes
    a moment more (Python's last garbage collection, about a second after a run), in which Ctrl-C and
    SIGTERM are ignored. Not a handler of ours: Python's finalization puts those back to the default
    action, a death by the signal, which a scheduler reads as a crash."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def run_program(main, stopped_before_main):
    """train.py's and evaluate.py's `__main__`: main() with the signals handed to it from the handler
    the script installed before its imports (`stopped_before_main`), output that survives paths
    that are not UTF-8 on any terminal (see _bytes_or_escape), and the signals ignored during the
    exit (signals_while_exiting)."""
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is stopped_before_main:
            signal.signal(signum, default)  # main() handles them from here on
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="bytes_or_escape")
    try:
        main()
    finally:  # done or stopping: a Ctrl-C or SIGTERM during the exit interrupts nothing
        signals_while_exiting()


def usable_workers(workers, say):
    """--workers, at most the CPUs available here (with a note where `say`: rank 0, progress shown)."""
    usable = min(workers, available_cpus())
    if say and usable < workers:
        print(f"note: --workers {workers} lowered to {usable}, the CPUs available here", flush=True)
    return usable


def stopped_by(interrupt):
    """A KeyboardInterrupt (Ctrl-C), Terminated or DeferredInterrupt -> the word for it in the line the
    programs end with, and their exit status (128 + the signal's number: 130 or 143)."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    return ("terminated" if signum == signal.SIGTERM else "interrupted"), 128 + signum


def _bytes_or_escape(error):
    """Encoding error handler of train.py's and evaluate.py's stdout and stderr: a path's bytes that
    are not valid UTF-8 (Linux allows any; Python holds them as lone surrogates) go out as those
    bytes, as `ls` shows them; any other character the stream cannot encode (a category name on a
    terminal that is not UTF-8) as a backslash escape. Never an error, which would turn a one-line
    message into a traceback."""
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(error)


codecs.register_error("bytes_or_escape", _bytes_or_escape)


def init_worker(worker_id):
    """worker_init_fn of the DataLoaders. A scheduler's SIGTERM reaches every process of the job, and
    the stop is the main process's to make (a worker killed by it would turn the stop into "worker
    killed"): the workers ignore it, and end when the loader is shut down, or when their parent is
    gone. And a main process stopped (Ctrl-C, SIGTERM) while it takes a batch from a worker cuts
    the connection over which the worker hands it the batch's shared memory: the worker's thread
    that serves it (multiprocessing's resource_sharer, which reports through sys.excepthook) would
    print a traceback under the stop's one line. It says nothing."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = _quiet_when_the_main_process_left


def _quiet_when_the_main_process_left(exc_type, exc, traceback):
    if not issubclass(exc_type, (BrokenPipeError, ConnectionResetError, EOFError)):
        sys.__excepthook__(exc_type, exc, traceback)


def loader_batches(loader):
    """Iterates a DataLoader and, when a worker's error reaches the main process (a DataError: an
    image that fails at decode), stops the worker processes at once. Left to themselves they would
    outlive the error: torch re-raises it from a frame that holds it, a reference cycle that keeps
    the loader's iterator alive up to the interpreter's exit, where multiprocessing ends the
    workers with SIGTERM, which they ignore (init_worker), and waits for them forever."""
    batches = iter(loader)
    try:
        yield from batches
    except Exception:
        if hasattr(batches, "_shutdown_workers"):  # worker processes: torch's own end-of-loader call
            batches._shutdown_workers()
        raise


class DeferredInterrupt(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM (`signum`) that signals_deferred held back until its block had completed."""

    def __init__(self, signum=signal.SIGINT, *args):
        super().__init__(*args)
        self.signum = signum


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, or SIGTERM where the program handles it (catch_stop_signals), inside the block waits for the
    block's end, then stops the program as anywhere else, as a DeferredInterrupt. As anywhere else, a
    second one is ignored and a third ends the process at once (a checkpoint being written is then
    lost, the previous one kept: write_atomic). A signal that is ignored or left to the system's
    default stays so; signals are handled in the main thread only."""
    caught = []

    def hold_back(signum, frame):
        global _held_back
        caught.append(signum)
        _held_back += 1
        if _stops + _held_back >= 3:  # counting those held back by the blocks this one is inside
            _stop_at_once(signum)

    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread()
               and signal.getsignal(s) not in (signal.SIG_IGN, signal.SIG_DFL, None)]
    previous = {s: signal.signal(s, hold_back) for s in handled}
    global _stops, _held_back
    try:
        yield
    finally:
        # the signals blocked while the handlers and the counts change: one that comes meanwhile
        # is delivered after, to the handler put back (else hold_back would count it, unraised)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled) if handled else None
        try:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _held_back -= len(caught)
            _stops += len(caught)  # the signals held back count as _stop's own
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if caught:  # the signal held back
        raise DeferredInterrupt(caught[0])


def _partial(path):
    return f"{path}.tmp"  # where write_atomic writes before the rename


def remove_partial_writes(folder, names):
    """Delete what a kill in the middle of write_atomic left of the files `names` (glob patterns,
    such as "pictures/*.png") in `folder`."""
    for name in names:
        for partial in glob.glob(_partial(os.path.join(glob.escape(folder), name))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)


def write_atomic(path, data):
    """Write the bytes `data` to `path` through a temporary file, flushed to disk, then renamed over
    `path`: a kill at any moment leaves either the old file or the new one, never half of one (the
    directory is flushed too, where the file system allows, so that a power cut does not undo the
    rename). Ctrl-C waits for the end of the write (a third ends the process at once, see
    signals_deferred). A failed write (a full disk) removes the temporary file and raises OSError
    naming `path`, the old file untouched."""
    tmp = _partial(path)
    with signals_deferred():
        try:
            _in_a_thread(lambda: _write_to_disk(tmp, data))
            os.replace(tmp, path)
        except BaseException as e:  # a full disk; or an error raised by a handler (torch's, of a killed worker)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if not isinstance(e, OSError):
                raise
            raise OSError(e.errno, f"cannot be written ({e.strerror}); the previous file, if any, is unchanged",
                          path) from None
        try:
            directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError:  # some network file systems refuse to flush a directory: durability only
            pass


def _write_to_disk(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _in_a_thread(fn):
    """fn() in another thread, this one waiting for it in short steps: Python runs signal handlers
    in the main thread only, between two steps of its own, never inside one write or fsync call,
    which for a large checkpoint on a slow disk can take seconds (three Ctrl-C there would come
    out as one, after it). fn's exception, or one a handler raises meanwhile (such as torch's for a
    killed DataLoader worker), is raised here once fn is done."""
    failed, done = [], threading.Event()

    def run():
        try:
            fn()
        except BaseException as e:
            failed.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not done.is_set():  # not thread.is_alive(): a join that a handler's exception interrupts ends it
        try:
            done.wait(0.05)
        except BaseException as e:  # from a signal handler: raised once fn is done
            failed.insert(0, e)
    if failed:
        raise failed[0]


def load_checkpoint_file(path):
    """torch.load of a checkpoint of train.py, on the CPU, after checking every part of the file
    (torch.save writes a zip archive) against the CRC-32 stored with it: torch.load reads a file
    damaged in its middle (a failing disk, a bad copy) without noticing, and a run would go on
    from, or an evaluation report, weights that no training made. The file is opened once, so that
    what is loaded is what was checked (a last.pt replaced meanwhile stays out), and read twice (the
    second time from the page cache). weights_only=False: last.pt holds numpy's RNG state; load
    only checkpoints you trust."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                raise ValueError(f"its part {damaged} does not match its checksum: the file is damaged")
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=False)


def error_line(e):
    """An exception as one short line, "Type: the first sentence of its message": torch.load's
    errors run over several lines, or on into a paragraph of advice."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {re.split(r'(?<=[a-z0-9)])[.] ', text, maxsplit=1)[0]}"


@contextlib.contextmanager
def directory_lock(path):
    """An exclusive lock on the output directory of a run of train.py or evaluate.py (its file
    .lock), held by rank 0 while the run writes there: a second run in it would write the same
    last.pt.tmp and log.jsonl, or detections beside another run's metrics (say, a resume while the
    workers of a torchrun stopped with kill -9 still go on: they outlive it). A POSIX record lock:
    the kernel drops it when the process ends, kill -9 included, and forked DataLoader workers
    (which may linger a few seconds after their parent died) do not inherit it, so none is left
    stale. Creates the directory; removes it again if the run leaves nothing else there."""
    created = not os.path.isdir(path)
    lock = os.path.join(path, ".lock")
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if os.path.isfile(path):
            raise ValueError(f"--output {path} is a file, not a directory") from None
        raise ValueError(f"--output {path}: cannot write there ({e.strerror})") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            created = False  # the other run's
            raise ValueError(f"{path} is in use by another run of train.py or evaluate.py (after kill -9 on "
                             f"torchrun its workers go on): stop it, or use another --output") from None
        except OSError as e:  # a file system without locks (NFS mounted nolock, some parallel ones)
            print(f"note: {path} cannot be locked ({e.strerror}): make sure no other run writes there",
                  flush=True)
        yield
    finally:
        if created and os.listdir(path) == [".lock"]:  # stopped before writing anything: no directory left
            os.remove(lock)
            os.rmdir(path)
        os.close(fd)


def on_rank0(fn, ddp, master):
    """fn() on rank 0 alone while the other ranks wait (building `shapes`, checking every image,
    creating the output folder), and its outcome for all: its value on rank 0 (None on the others),
    or the user error it raised (DataError, ValueError) raised on every rank. A rank that merely
    waited at a barrier would die there instead, with a traceback of the connection rank 0 closed."""
    value, error = None, None
    if master:
        try:
            value = fn()
        except (DataError, ValueError) as e:
            error = e
    if ddp:
        shared = [None if error is None else (type(error), str(error))]
        torch.distributed.broadcast_object_list(shared, src=0)
        if shared[0] is not None and not master:
            kind, message = shared[0]
            error = kind(message)
    if error is not None:
        raise error
    return value


def resolve_root_once(data, ddp, master):
    """resolve_root on rank 0 first (it may build `shapes`), then on the other ranks."""
    root = on_rank0(lambda: resolve_root(data), ddp, master)
    return root if master else resolve_root(data)


def print_stop(message, own=False):
    """Print the line that ends a run on stderr: under torchrun from rank 0 alone, since every
    process meets the same errors (those of the checks rank 0 alone makes are shared by on_rank0),
    unless `own`: an error this process alone met (an ImageError in its share of the images)."""
    if own or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def stop_on_failure(e):
    """End a run stopped by the machine or by another process of it, with one line and status 1:
    an OSError (a full disk, a file system gone read-only) names its file; a DataLoader worker or a
    process of a pool killed (by the kernel's out-of-memory killer, most likely) says so; a collective that lost
    another process (lost_connection) says so, once. Anything else is raised again: a bug, whose
    traceback is wanted."""
    if isinstance(e, OSError):
        message, own = (f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}"), True
    elif isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker"):  # from torch's SIGCHLD handler
        first = str(e).split(". ")[0].rstrip(". ")  # "DataLoader worker (pid 7) is killed by signal: Killed"
        hint = ("out of memory? fewer --workers use less" if first.endswith("Killed") else
                "too little shared memory (/dev/shm)?" if first.endswith("Bus error") else
                "killed, out of memory? --workers 0 shows an error of its own")  # "exited unexpectedly"
        message, own = f"error: {first} ({hint})", True
    elif isinstance(e, concurrent.futures.BrokenExecutor):  # a process of a pool (image checks, COCOeval) killed
        message, own = f"error: {e} (killed, out of memory?)", True
    elif lost_connection(e):
        message, own = "error: stopped: another process of this run stopped (its message, if any, is above)", False
    else:
        raise e
    end_progress_line()
    print_stop(message, own=own)
    sys.exit(1)


def lost_connection(e):
    """Whether `e` is a collective failing because another process of the run died (gloo raises
    as soon as the connection closes; with NCCL the collective waits until torchrun stops this
    process). That process printed its own message, if it had time to."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1  # the process group may be destroyed by now
            and (isinstance(e, torch.distributed.DistError)
                 or any(s in str(e) for s in ("Connection closed by peer", "Connection reset by peer"))))


if __name__ == "__main__":
    prepare_shapes()
