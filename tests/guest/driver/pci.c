#include "pci.h"

#define CONFIG_ADDRESS 0xCF8
#define CONFIG_DATA 0xCFC

static u32 cfg_addr(u8 slot, u8 reg)
{
    return 0x80000000u | ((u32)slot << 11) | (reg & 0xFCu);   /* bus 0, function 0 */
}

u32 pci_read32(u8 slot, u8 reg)
{
    outl(CONFIG_ADDRESS, cfg_addr(slot, reg));
    return inl(CONFIG_DATA);
}

void pci_write32(u8 slot, u8 reg, u32 v)
{
    outl(CONFIG_ADDRESS, cfg_addr(slot, reg));
    outl(CONFIG_DATA, v);
}

u16 pci_read16(u8 slot, u8 reg) { return (u16)(pci_read32(slot, reg) >> ((reg & 2) * 8)); }
u8 pci_read8(u8 slot, u8 reg) { return (u8)(pci_read32(slot, reg) >> ((reg & 3) * 8)); }

static void read_bars(struct pci_dev *d)
{
    for (int i = 0; i < 6; i++) {
        u32 v = pci_read32(d->slot, PCI_BAR0 + 4 * i);
        d->bar[i] = 0;
        d->bar_is_io[i] = 0;
        if (v & 1) {
            d->bar_is_io[i] = 1;
            continue;
        }
        u64 addr = v & ~0xFull;
        if (((v >> 1) & 3) == 2 && i < 5) {    /* 64-bit: the high half is the next register */
            addr |= (u64)pci_read32(d->slot, PCI_BAR0 + 4 * (i + 1)) << 32;
            d->bar[i] = addr;
            i++;
            d->bar[i] = 0;
            d->bar_is_io[i] = 0;
            continue;
        }
        d->bar[i] = addr;
    }
}

bool pci_find(u16 vendor, u16 device, unsigned index, struct pci_dev *out)
{
    for (u8 slot = 0; slot < 32; slot++) {
        u32 id = pci_read32(slot, 0);
        if ((id & 0xFFFF) == 0xFFFF || (id & 0xFFFF) != vendor || (id >> 16) != device)
            continue;
        if (index--)
            continue;
        out->slot = slot;
        out->vendor = (u16)id;
        out->device = (u16)(id >> 16);
        read_bars(out);
        return true;
    }
    return false;
}

u8 pci_next_cap(u8 slot, u8 pos, unsigned *guard)
{
    u8 next;
    if (pos == 0) {
        if (!(pci_read16(slot, PCI_STATUS) & PCI_STATUS_CAP_LIST))
            return 0;
        next = pci_read8(slot, PCI_CAP_PTR);
    } else {
        next = pci_read8(slot, pos + 1);
    }
    next &= 0xFC;
    if (next < 0x40 || ++*guard > 48)
        return 0;
    return next;
}
