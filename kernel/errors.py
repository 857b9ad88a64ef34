"""The one exception the kernel loader raises for bad input."""


class KernelImageError(ValueError):
    """A kernel, initrd or command line cannot be loaded.

    The message is one line that names what is wrong, meant to be shown to the
    user as is (the CLI prints it and exits 2).
    """
