"""Small helpers every kiln module may use: the scripts' error wrapper, atomic file writes, file
hashes and the device choice. Bottom floor: imports no other kiln module (and torch only inside
pick_device)."""
import hashlib
import json
import os
import shutil
import sys
import traceback
from pathlib import Path


def cli(main):
    """Run main(); bad input (ValueError, FileNotFoundError) becomes one line on stderr and exit
    status 2 (KILN_DEBUG=1 prints the traceback too). Every script's entry point."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("KILN_DEBUG") == "1":
            traceback.print_exc()
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


def write_atomic(path, *chunks):
    """Write bytes to a temporary name, then rename: no reader ever sees a half-written file."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    os.replace(tmp, path)


def write_json(path, obj, indent=2):
    """JSON, indented, written atomically."""
    write_atomic(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())


def replace_dir(tmp, final):
    """Move the finished folder tmp to final, replacing an older final (rename is atomic, rmtree is
    not)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pick_device(name="auto"):
    """"auto" -> the best device here (CUDA, then Apple MPS, then CPU); any other name as given."""
    import torch  # here: data preparation and the tokenizer use this module without torch
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
