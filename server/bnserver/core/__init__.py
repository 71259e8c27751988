"""The numeric core: pure numpy functions and the module configuration they serve.

* `kernel`  statistics, normalization and gradients on (N, C, *spatial) arrays;
* `config`  a module's construction arguments (MegEngine's names), validated once.
"""
