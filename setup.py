"""Install the top-level folders under one import root: server/ -> jang_serve.server, etc."""
import os

from setuptools import setup

ROOTS = ("server", "engine", "kernels", "quantize")


def _packages():
    pkgs, dirs = ["jang_serve"], {"jang_serve": "jang_serve"}
    for root in ROOTS:
        for here, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__"))]
            if "__init__.py" in files:
                name = "jang_serve." + here.replace(os.sep, ".")
                pkgs.append(name)
                dirs[name] = here
    return pkgs, dirs


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"jang_serve.kernels": ["*.cu", "*.metal", "*.md"], "jang_serve.quantize": ["data/*"]},
)
