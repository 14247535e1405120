"""Sphinx configuration of the fastattn documentation.

Build (from the repository root, with ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The gallery (``examples/gallery``) runs while the site builds; the performance
page's tables are rendered from benchmark results found at build time
(``docs/_ext/benchmark_tables.py``).
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's fastattn and reference
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

import fastattn  # noqa: E402

project = "fastattn"
author = "the fastattn developers"
copyright = "the fastattn developers"
release = version = fastattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "benchmark_tables",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
html_static_path = []

# --- API reference: one page per public name, from its numpydoc docstring ---
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False  # classes list their methods through autosummary
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# No network at build time: intersphinx has no inventories to fetch, so references to
# NumPy or PyTorch objects stay plain text.
intersphinx_mapping = {}

# --- gallery: examples/gallery/*.py run while the site builds, figures drawn with Agg ---
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples" / "gallery"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "abort_on_example_error": True,
}

# --- HTML ---
html_theme = "pydata_sphinx_theme"
html_title = f"fastattn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"index": [], "contract": []}
html_show_sourcelink = False
html_copy_source = False
