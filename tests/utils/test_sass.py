"""ifbf_fast.utils.sass: the SASS reader and the occupancy arithmetic that the bytes-in-flight tests of
the CUDA and Triton kernels rest on (tests/ops/test_inplace_abn_sass.py, test_fbf_aot.py,
test_ohem_ce_aot.py), on hand-written instruction sequences and known sm_90 limits."""
from ifbf_fast.utils import sass


def _ins(i, text):
    return f"        /*{i * 16:04x}*/                   {text} ;                  /* 0x000000061c0c9981 */\n"


def test_loads_counted_until_their_first_use():
    batched = "".join(_ins(i, f"@!P{i} LDG.E.128.CONSTANT R{12 + 4 * i}, desc[UR6][R2.64+0x{i * 512:x}]")
                      for i in range(4))
    batched += _ins(4, "PRMT R6, R12, 0x7632, R6") + _ins(5, "FFMA R7, R16, R9, R10")
    assert sass.loads_in_flight(batched) == 4
    serial = "".join(_ins(2 * i, f"LDG.E.128 R12, desc[UR6][R2.64+0x{i * 512:x}]")
                     + _ins(2 * i + 1, "FADD R40, R40, R13") for i in range(4))
    assert sass.loads_in_flight(serial) == 1
    # a load whose address is the previous load's result waits for it
    chased = _ins(0, "LDG.E.128 R12, desc[UR6][R2.64]") + _ins(1, "LDG.E.128 R16, desc[UR6][R12.64]")
    assert sass.loads_in_flight(chased) == 1
    # a store of a loaded value uses it; narrower loads do not count
    stored = _ins(0, "LDG.E.128 R12, desc[UR6][R2.64]") + _ins(1, "STG.E.128 desc[UR6][R4.64], R12") \
        + _ins(2, "LDG.E.64 R20, desc[UR6][R2.64]")
    assert sass.loads_in_flight(stored) == 1
    assert sass.loads_in_flight(_ins(0, "LDG.E R20, desc[UR6][R2.64]")) == 0



def test_memory_opcodes_counts_each_memory_instruction_with_its_modifiers():
    text = (_ins(0, "@!P0 LDG.E.U16 R4, desc[UR6][R2.64]") + _ins(1, "LDG.E.U16 R5, desc[UR6][R2.64+0x2]")
            + _ins(2, "LDG.E.128.CONSTANT R12, desc[UR6][R8.64]") + _ins(3, "FADD R6, R4, R5")
            + _ins(4, "STG.E.128 desc[UR6][R10.64], R12") + _ins(5, "STL.64 [R1], R2") + _ins(6, "LDS R7, [R3]"))
    assert sass.memory_opcodes(text) == {"LDG.E.U16": 2, "LDG.E.128.CONSTANT": 1, "STG.E.128": 1, "STL.64": 1}

def test_loop_bodies_run_from_each_backward_branch_target_to_the_branch():
    text = (_ins(0, "MOV R1, 0x0") + _ins(1, "FADD R2, R2, R3") + _ins(2, "ISETP.NE.AND P0, PT, R4, RZ, PT")
            + _ins(3, "@P0 BRA 0x10") + _ins(4, "FMUL R5, R2, R2") + _ins(5, "BRA 0x60")
            + _ins(6, "EXIT") + _ins(7, "BRA `(.L_x_3) 0x40"))
    loops = sass.loop_bodies(text)
    assert [len(b) for b in loops] == [3, 4]            # 0x10..0x30, then 0x40..0x70; BRA 0x60 goes forward
    assert loops[0][0].startswith("FADD") and loops[0][-1] == "@P0 BRA 0x10"
    assert sass.loop_bodies(_ins(0, "EXIT")) == []


def test_resident_blocks_follow_the_sm90_limits():
    assert sass.resident_blocks(4, 32) == 16                 # warps: 64 per SM
    assert sass.resident_blocks(1, 16) == 32                 # blocks: 32 per SM
    assert sass.resident_blocks(4, 128) == 4                 # registers: 65536 / (128 * 32 * 4)
    assert sass.resident_blocks(8, 149) == 1                 # 149 -> 152 per thread: 13 warps fit
    assert sass.resident_blocks(8, 64, shared=100 * 1024) == 2   # shared memory: 228 KiB per SM
    assert sass.resident_blocks(8, 256) == 1
    assert sass.resident_blocks(32, 255) == 0                 # 1024 threads x 255 registers do not fit


def test_bytes_in_flight_per_sm():
    # 4 resident blocks of 128 threads, 4 loads of 16 bytes each
    assert sass.bytes_in_flight_per_sm(4, 128, 4, programs=10 ** 6) == 4 * 128 * 4 * 16
    # a grid of 264 programs gives each of the 132 SMs 2, whatever the occupancy allows
    assert sass.bytes_in_flight_per_sm(4, 32, 4, programs=264) == 2 * 128 * 4 * 16
    assert sass.H200_BYTES_IN_FLIGHT // sass.H200_SMS == 22727
