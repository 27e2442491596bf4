"""Checks a built kcore wheel (scripts/build_wheel.sh runs it): python scripts/check_wheel.py WHEEL

- the platform tag is a manylinux one (auditwheel repaired it) and `auditwheel show` agrees;
- the extension kcore/_C*.so needs only the system libraries a manylinux tag allows: no libtorch /
  libc10 (one wheel serves every torch), no libpython (the interpreter provides those symbols), no
  CUDA runtime (the CPU wheel runs without one), and no undefined libtorch symbol;
- the Triton kernels (kcore/kernels), the type stubs (kcore/_C.pyi) and kcore/py.typed are inside;
- prints the wheel's size. Exits non-zero with the reasons on any failure.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

# What a manylinux extension may link (PEP 600: the system's glibc, libstdc++ and libgcc).
ALLOWED_NEEDED = re.compile(r"^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux-x86-64|ld-linux-aarch64)\.so")
REQUIRED = ["kcore/__init__.py", "kcore/_C.pyi", "kcore/py.typed", "kcore/kernels/__init__.py",
            "kcore/kernels/bitmask.py", "kcore/kernels/knn.py", "kcore/kernels/memory_attention.py"]


def main(path: str) -> int:
    errors = []
    name = path.rsplit("/", 1)[-1]
    if "manylinux" not in name:
        errors.append(f"{name}: no manylinux platform tag (not repaired by auditwheel?)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        for req in REQUIRED:
            if req not in names:
                errors.append(f"missing {req}")
        exts = [n for n in names if re.fullmatch(r"kcore/_C\.[^/]*\.so", n)]
        if len(exts) != 1:
            errors.append(f"expected one kcore/_C*.so, found {exts}")
        grafted = [n for n in names if n.startswith("kcore.libs/")]
        if grafted:
            errors.append(f"auditwheel had to bundle libraries: {grafted}")
        unpacked = sum(i.file_size for i in zf.infolist())
        for ext in exts:
            elf = ELFFile(io.BytesIO(zf.read(ext)))
            needed = [t.needed for s in elf.iter_sections() if isinstance(s, DynamicSection)
                      for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
            for lib in needed:
                if not ALLOWED_NEEDED.match(lib):
                    errors.append(f"{ext} links {lib}")
            dynsym = elf.get_section_by_name(".dynsym")
            undefined = {s.name for s in dynsym.iter_symbols() if s["st_shndx"] == "SHN_UNDEF" and s.name}
            torch_syms = sorted(s for s in undefined if s.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch")))
            if torch_syms:
                errors.append(f"{ext} needs libtorch symbols: {torch_syms[:5]}")
            print(f"{ext}: needs {', '.join(needed)}; {len(undefined)} undefined symbols, none from libtorch")
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", path], capture_output=True, text=True)
    if show.returncode != 0:
        errors.append(f"auditwheel show failed: {show.stderr.strip()}")
    else:
        print(" ".join(show.stdout.split()))
    print(f"{name}: {os.path.getsize(path) / 1e6:.2f} MB ({unpacked / 1e6:.2f} MB unpacked, {len(names)} files)")
    for e in errors:
        print(f"check_wheel: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
