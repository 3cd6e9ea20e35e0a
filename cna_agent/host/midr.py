"""Decode Arm MIDR_EL1 values into vendor and core names.

The agent reports ``cpu_model`` to the VRM and the placement planner keys CPU-model
compatibility (live migration between TaiShan generations) on the decoded part, so the
names must be stable strings. Values follow the Arm ARM field layout and the public
implementer/part numbers (as used by Linux's cputype.h and util-linux's lscpu); the table is
written here, not copied. Unknown values decode to "unknown (0x..)" rather than failing:
a new core must never stop a probe.

MIDR_EL1 layout: [31:24] implementer, [23:20] variant, [19:16] architecture,
[15:4] part number, [3:0] revision.
"""

from __future__ import annotations

IMPLEMENTERS: dict[int, str] = {
    0x41: "ARM",
    0x42: "Broadcom",
    0x43: "Cavium",
    0x44: "DEC",
    0x46: "Fujitsu",
    0x48: "HiSilicon",
    0x49: "Infineon",
    0x4D: "Motorola/Freescale",
    0x4E: "NVIDIA",
    0x50: "Applied Micro",
    0x51: "Qualcomm",
    0x53: "Samsung",
    0x56: "Marvell",
    0x61: "Apple",
    0x66: "Faraday",
    0x69: "Intel",
    0x6D: "Microsoft",
    0x70: "Phytium",
    0xC0: "Ampere",
}

PARTS: dict[int, dict[int, str]] = {
    0x41: {
        0xD00: "Foundation model",
        0xD02: "Cortex-A34",
        0xD03: "Cortex-A53",
        0xD04: "Cortex-A35",
        0xD05: "Cortex-A55",
        0xD06: "Cortex-A65",
        0xD07: "Cortex-A57",
        0xD08: "Cortex-A72",
        0xD09: "Cortex-A73",
        0xD0A: "Cortex-A75",
        0xD0B: "Cortex-A76",
        0xD0C: "Neoverse-N1",
        0xD0D: "Cortex-A77",
        0xD0E: "Cortex-A76AE",
        0xD0F: "AEMv8 model",
        0xD40: "Neoverse-V1",
        0xD41: "Cortex-A78",
        0xD42: "Cortex-A78AE",
        0xD44: "Cortex-X1",
        0xD46: "Cortex-A510",
        0xD47: "Cortex-A710",
        0xD48: "Cortex-X2",
        0xD49: "Neoverse-N2",
        0xD4A: "Neoverse-E1",
        0xD4B: "Cortex-A78C",
        0xD4C: "Cortex-X1C",
        0xD4D: "Cortex-A715",
        0xD4E: "Cortex-X3",
        0xD4F: "Neoverse-V2",
        0xD80: "Cortex-A520",
        0xD81: "Cortex-A720",
        0xD82: "Cortex-X4",
        0xD84: "Neoverse-V3",
        0xD85: "Cortex-X925",
        0xD87: "Cortex-A725",
        0xD8E: "Neoverse-N3",
    },
    0x42: {
        0x00F: "Brahma-B15",
        0x100: "Brahma-B53",
        0x516: "Vulcan",
    },
    0x43: {
        0x0A0: "ThunderX",
        0x0A1: "ThunderX 88xx",
        0x0A2: "ThunderX 81xx",
        0x0A3: "ThunderX 83xx",
        0x0AF: "ThunderX2 99xx",
        0x0B8: "ThunderX3 T110",
    },
    0x46: {
        0x001: "A64FX",
    },
    0x48: {
        # HiSilicon's own cores. Kunpeng 916 (Hi1616) used Arm Cortex-A72 (implementer 0x41).
        0xD01: "Kunpeng 920 (TaiShan v110)",
        0xD02: "Kunpeng 920B (TaiShan v120)",
    },
    0x4E: {
        0x000: "Denver",
        0x003: "Denver 2",
        0x004: "Carmel",
    },
    0x50: {
        0x000: "X-Gene",
    },
    0x51: {
        0x001: "Oryon",
        0x00F: "Scorpion",
        0x02D: "Scorpion",
        0x04D: "Krait",
        0x06F: "Krait",
        0x201: "Kryo",
        0x205: "Kryo",
        0x211: "Kryo",
        # 0x800 is both Falkor v1 and the Kryo 2xx "Gold" core in public tables.
        0x800: "Falkor v1 / Kryo 2xx Gold",
        0x801: "Kryo 2xx Silver",
        0x802: "Kryo 3xx Gold",
        0x803: "Kryo 3xx Silver",
        0x804: "Kryo 4xx Gold",
        0x805: "Kryo 4xx Silver",
        0xC00: "Falkor",
        0xC01: "Saphira",
    },
    0x53: {
        0x001: "Exynos M1",
        0x002: "Exynos M3",
    },
    0x56: {
        0x131: "Feroceon 88FR131",
        0x581: "PJ4/PJ4b",
        0x584: "PJ4B-MP",
    },
    0x61: {
        0x022: "M1 Icestorm",
        0x023: "M1 Firestorm",
        0x024: "M1 Pro Icestorm",
        0x025: "M1 Pro Firestorm",
        0x028: "M1 Max Icestorm",
        0x029: "M1 Max Firestorm",
        0x032: "M2 Blizzard",
        0x033: "M2 Avalanche",
        0x034: "M2 Pro Blizzard",
        0x035: "M2 Pro Avalanche",
        0x038: "M2 Max Blizzard",
        0x039: "M2 Max Avalanche",
    },
    0x6D: {
        0xD49: "Azure Cobalt 100",
    },
    0x70: {
        0x303: "FTC310",
        0x660: "FTC660",
        0x661: "FTC661",
        0x662: "FTC662",
        0x663: "FTC663",
        0x664: "FTC664",
        0x862: "FTC862",
    },
    0xC0: {
        0xAC3: "Ampere-1",
        0xAC4: "Ampere-1a",
        0xAC5: "Ampere-1b",
    },
}


def implementer_name(implementer: int) -> str:
    """Vendor name for an implementer code, "unknown (0x..)" when not in the table."""
    return IMPLEMENTERS.get(implementer, f"unknown (0x{implementer:02x})")


def part_name(implementer: int, part: int) -> str:
    """Core name for (implementer, part); "unknown (0x...)" when not in the table."""
    return PARTS.get(implementer, {}).get(part, f"unknown (0x{part:03x})")


def split_midr(raw: int) -> tuple[int, int, int, int, int]:
    """(implementer, variant, architecture, part, revision) from a MIDR_EL1 value."""
    raw &= 0xFFFFFFFF  # MIDR_EL1 is 64-bit in sysfs but only the low word is defined
    return (
        (raw >> 24) & 0xFF,
        (raw >> 20) & 0xF,
        (raw >> 16) & 0xF,
        (raw >> 4) & 0xFFF,
        raw & 0xF,
    )


def join_midr(implementer: int, variant: int, architecture: int, part: int, revision: int) -> int:
    """Inverse of split_midr; used to rebuild a MIDR from /proc/cpuinfo's fields."""
    return (
        (implementer & 0xFF) << 24
        | (variant & 0xF) << 20
        | (architecture & 0xF) << 16
        | (part & 0xFFF) << 4
        | (revision & 0xF)
    )
