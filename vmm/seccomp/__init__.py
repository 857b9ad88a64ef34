"""The syscall filter pyvmm installs once a VM is set up (--seccomp), as a classic-BPF seccomp
program built with ctypes.

    from vmm import seccomp
    machine = Machine(config)                 # set-up: devices, backends, kernel, vCPUs
    note = seccomp.install(config.seccomp)    # every thread, for good (SeccompUnavailable: why not)
    machine.run()

policy.py: what is denied and why, and the program; installer.py: the modes, the kernel's probes,
seccomp(2); bpf.py: the assembler; abi.py: the kernel's structures and constants; syscalls.py:
the x86-64 numbers.  The filter is the process's, not a VM's: `pyvmm run` installs it (vmm/cli.py);
a program that embeds Machine and goes on to run other programs does not call install()."""

from .installer import MODES, SeccompUnavailable, install, installed
from .policy import DENIED, build_filter

__all__ = ["DENIED", "MODES", "SeccompUnavailable", "build_filter", "install", "installed"]
