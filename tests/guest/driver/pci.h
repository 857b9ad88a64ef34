/* PCI configuration mechanism #1 on bus 0, function 0 of each slot. */
#ifndef PYVMM_DRIVER_PCI_H
#define PYVMM_DRIVER_PCI_H

#include "lib.h"

#define PCI_VENDOR_VIRTIO   0x1AF4
#define PCI_DEVICE_VIRTIO(id) (0x1040 + (id))

#define PCI_COMMAND         0x04
#define PCI_COMMAND_IO      0x1
#define PCI_COMMAND_MEMORY  0x2
#define PCI_COMMAND_MASTER  0x4
#define PCI_STATUS          0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_BAR0            0x10
#define PCI_CAP_PTR         0x34
#define PCI_CAP_ID_MSIX     0x11
#define PCI_CAP_ID_VNDR     0x09

struct pci_dev {
    u8 slot;
    u16 vendor, device;
    u64 bar[6];         /* memory BAR addresses (0: absent or I/O) */
    u8 bar_is_io[6];
};

u32 pci_read32(u8 slot, u8 reg);
void pci_write32(u8 slot, u8 reg, u32 v);
u16 pci_read16(u8 slot, u8 reg);
u8 pci_read8(u8 slot, u8 reg);

/* The index-th device (in slot order) with this vendor and device id; false if none. */
bool pci_find(u16 vendor, u16 device, unsigned index, struct pci_dev *out);
/* Next capability after `pos` (0: the first), 0 at the end; loops are cut short. */
u8 pci_next_cap(u8 slot, u8 pos, unsigned *guard);

#endif
