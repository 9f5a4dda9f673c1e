"""The losses inside the frameworks users train with.

Each submodule imports its host framework lazily (only when the submodule itself is imported)
and is installed with the optional extra of the same name::

    pip install "eqlosses[ultralytics]"   # eqlosses.integrations.ultralytics
    pip install "eqlosses[lightning]"     # eqlosses.integrations.lightning
    pip install "eqlosses[vision]"        # eqlosses.integrations.torchvision

Importing ``eqlosses.integrations`` itself imports no host framework.
"""
