#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*): inputs that reach
the deep paths a random start rarely finds -- a driver that negotiates,
sets up a queue in RAM, offers descriptor chains and activates the device;
virtio-net transmit and receive queues with good, wrong-direction and
looping chains;
well-formed stream headers; well-formed agent replies; the planner's spec
fixtures (agent/tests/fixtures/plan); seccomp profiles with conditions on
both 32-bit words of an argument."""
import glob
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# virtio-mmio registers and status bits
STATUS, DRV_FEAT, DRV_FEAT_SEL = 0x70, 0x20, 0x24
Q_SEL, Q_NUM, Q_READY = 0x30, 0x38, 0x44
Q_DESC, Q_DRIVER, Q_DEVICE = 0x80, 0x90, 0xA0
Q_NOTIFY = 0x50


def op_write(off, val):
    return bytes([1 | (2 << 2)]) + struct.pack("<HI", off, val)


def op_read(off):
    return bytes([0 | (2 << 2)]) + struct.pack("<HI", off, 0)


def driver(queue_size, desc, avail, used):
    ops = [
        op_read(0x00), op_read(0x04), op_read(0x08),
        op_write(STATUS, 1), op_write(STATUS, 3),
        op_write(DRV_FEAT_SEL, 1), op_write(DRV_FEAT, 1),
        op_write(DRV_FEAT_SEL, 0), op_write(DRV_FEAT, 0b111),
        op_write(STATUS, 11), op_read(STATUS),
        op_write(Q_SEL, 0), op_write(Q_NUM, queue_size),
        op_write(Q_DESC, desc), op_write(Q_DESC + 4, 0),
        op_write(Q_DRIVER, avail), op_write(Q_DRIVER + 4, 0),
        op_write(Q_DEVICE, used), op_write(Q_DEVICE + 4, 0),
        op_write(Q_READY, 1),
        op_write(STATUS, 15), op_write(Q_NOTIFY, 0), op_read(0x60),
        op_write(0x64, 1), op_write(STATUS, 0),
    ]
    return ops


def ram_with_chains(size, desc, avail, chains):
    ram = bytearray(size)
    # descriptors: (addr u64, len u32, flags u16, next u16)
    i = 0
    heads = []
    for chain in chains:
        heads.append(i)
        for j, (addr, length, write) in enumerate(chain):
            last = j == len(chain) - 1
            flags = (0 if last else 1) | (2 if write else 0)
            nxt = 0 if last else i + 1
            struct.pack_into("<QIHH", ram, desc + 16 * i, addr, length, flags, nxt)
            i += 1
    # available ring: flags, idx, ring[]
    struct.pack_into("<HH", ram, avail, 0, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", ram, avail + 4 + 2 * k, h)
    return bytes(ram)


ops = driver(16, 0x1000, 0x2000, 0x3000)
ram = ram_with_chains(0x8000, 0x1000, 0x2000,
                      [[(0x4000, 64, False), (0x5000, 128, True)],
                       [(0x6000, 0xFFFFFFFF, False)],
                       [(0xFFFFFFFFFFFF0000, 16, True)]])
write("mmio_transport", "activate", struct.pack("<H", len(ops)) + b"".join(ops) + ram)
# A descriptor loop (next points back at itself).
loop = bytearray(ram_with_chains(0x8000, 0x1000, 0x2000, [[(0x4000, 8, False), (0x4000, 8, False)]]))
struct.pack_into("<QIHH", loop, 0x1000 + 16, 0x4000, 8, 1, 0)
write("mmio_transport", "loop", struct.pack("<H", len(ops)) + b"".join(ops) + bytes(loop))

# virtio_net: queue size log2, receive frame length (u16), a spare byte, then
# RAM with a transmit queue (desc 0x1000, avail 0x2000) and a receive queue
# (desc 0x4000, avail 0x5000), see fuzz_targets/virtio_net.rs.
def net_ram(tx_chains, rx_chains):
    ram = bytearray(ram_with_chains(0x10000, 0x1000, 0x2000, tx_chains))
    rx = ram_with_chains(0x10000, 0x4000, 0x5000, rx_chains)
    ram[0x4000:0x6000] = rx[0x4000:0x6000]
    return ram


net_head = struct.pack("<BHB", 4, 114, 0)
write("virtio_net", "good", net_head + bytes(net_ram(
    [[(0x8000, 12, False), (0x8100, 60, False)], [(0x8000, 200, False)]],
    [[(0x9000, 20, True), (0xA000, 2048, True)]])))
write("virtio_net", "bad-directions", net_head + bytes(net_ram(
    [[(0x8000, 12, False), (0x8100, 60, True)], [(0xFFFFFFFFFFFF0000, 64, False)]],
    [[(0x9000, 2048, False)], [(0x9000, 8, True)]])))
net_loop = net_ram([[(0x8000, 12, False), (0x8100, 60, False)]],
                   [[(0x9000, 8, True), (0x9100, 8, True)]])
struct.pack_into("<QIHH", net_loop, 0x1000 + 16, 0x8100, 60, 1, 0)
struct.pack_into("<QIHH", net_loop, 0x4000 + 16, 0x9100, 8, 3, 0)
write("virtio_net", "loops", net_head + bytes(net_loop))

# stream headers: magic, version, kind, 2 reserved, token
write("stream_header", "process", b"HUSK" + bytes([1, 1, 0, 0]) + struct.pack("<Q", 7))
write("stream_header", "echo", b"HUSK" + bytes([1, 2, 0, 0]) + struct.pack("<Q", 0))

# agent replies: first byte picks the message (see agent_reply.rs)
write("agent_reply", "wait-signal", bytes([0]) + bytes([0x08, 0x89, 0x01, 0x10, 0x13]))
write("agent_reply", "ps", bytes([1]) + bytes([0x0A, 0x08, 0x08, 0x01, 0x12, 0x04]) + b"\x1b[2J")
write("agent_reply", "stats", bytes([2]) + bytes([0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))

# agent_plan: the first byte picks container (even) or exec (odd) and the
# request's flags (see agent_plan.rs); the rest is the fixture's JSON.
# The fuzz target's guest has the fixtures' rootfs, so they plan.
for path in sorted(glob.glob(os.path.join(HERE, "..", "agent", "tests", "fixtures", "plan", "*.json"))):
    name = os.path.basename(path)[: -len(".json")]
    with open(path) as f:
        fixture = json.load(f)
    if "container" in fixture:
        c = fixture["container"]
        mode = (2 if c.get("shared_mounts") else 0) | (4 if c.get("no_pivot") else 0)
        body = c["spec"]
    else:
        e = fixture["exec"]
        mode = 1 | (2 if "seccomp" in e else 0) | (4 if e.get("init_pid") == 42 else 0)
        body = e["process"]
    write("agent_plan", name, bytes([mode]) + json.dumps(body, separators=(",", ":")).encode())

# seccomp_compile: action (byte, errno byte), rule count, then per rule: name
# count-1, name indices, action, errno, arg count, per arg: index, op, value
# tag, value-two tag (a tag below 0x80 picks an edge value; see the target).
def rule(names, action, args):
    out = bytes([len(names) - 1]) + bytes(names) + bytes([action, 1, len(args)])
    for index, op, v, two in args:
        out += bytes([index, op, v, two])
    return out
write("seccomp_compile", "every-op",
      bytes([1, 1, 5])
      + rule([0, 1], 0, [(0, 3, 3, 0), (1, 0, 2, 0)])
      + rule([5], 1, [(0, 3, 0, 0), (0, 3, 2, 0), (2, 1, 4, 0)])
      + rule([4], 3, [(1, 2, 6, 0), (3, 5, 7, 0)])
      + rule([2], 0, [(0, 6, 2, 4)])
      + rule([6, 7], 1, [(0, 4, 5, 0)]))
write("seccomp_compile", "allow-default-kill",
      bytes([3, 0, 2]) + rule([3], 0, []) + rule([0, 1, 2], 1, [(5, 0, 0x80, 0)]) + bytes(8) + bytes([0]))
