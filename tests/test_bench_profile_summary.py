"""bench/profile_summary on a hand-written XSpace: kernel time per program, kind and kernel; derived lines skipped."""
from jax.profiler import ProfileData

from ral_jax.bench import profile_summary as ps

_S = 10 ** 12   # picoseconds per second

XSPACE = f'''
planes {{
  id: 2 name: "/host:CPU"
  lines {{ id: 9 name: "python" events {{ metadata_id: 1 offset_ps: 0 duration_ps: {50 * _S} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "host work" }} }}
}}
planes {{
  id: 1 name: "/device:GPU:0"
  lines {{
    id: 1 name: "Stream #14(Compute)"
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: {3 * _S} stats {{ metadata_id: 10 str_value: "jit_rl_update" }} }}
    events {{ metadata_id: 2 offset_ps: {4 * _S} duration_ps: {1 * _S} stats {{ metadata_id: 10 str_value: "jit_rl_update" }} }}
    events {{ metadata_id: 1 offset_ps: {6 * _S} duration_ps: {2 * _S} stats {{ metadata_id: 10 str_value: "jit_score" }} }}
    events {{ metadata_id: 4 offset_ps: {9 * _S} duration_ps: {_S // 2} stats {{ metadata_id: 10 str_value: "jit_score" }} }}
  }}
  lines {{ id: 2 name: "XLA Ops" events {{ metadata_id: 3 offset_ps: 0 duration_ps: {9 * _S} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "nvjet_sm90_tst_128x160_NNT" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "loop_add_fusion_3" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "fusion.1" }} }}
  event_metadata {{ key: 4 value {{ id: 4 name: "cudnn_generated_fort_native_sdpa_sm90_flash_fprop" }} }}
  stat_metadata {{ key: 10 value {{ id: 10 name: "hlo_module" }} }}
}}
'''


def test_summary_adds_kernel_time_per_program_kind_and_kernel():
  s = ps.summarize(ProfileData.from_text_proto(XSPACE))
  assert s['device_plane'] == '/device:GPU:0'
  assert s['busy_s'] == 6.5                                   # the derived 'XLA Ops' line is not counted
  assert s['by_module'] == {'jit_rl_update': 4.0, 'jit_score': 2.5}
  assert s['by_kind'] == {'matmul': 5.0, 'fusion': 1.0, 'attention': 0.5}
  assert s['by_module_kind'] == {'jit_rl_update/matmul': 3.0, 'jit_score/matmul': 2.0, 'jit_rl_update/fusion': 1.0,
                                 'jit_score/attention': 0.5}
  assert s['top'][0] == {'module': 'jit_rl_update', 'kernel': 'nvjet_sm90_tst_128x160_NNT', 's': 3.0, 'count': 1}


def test_no_device_plane_says_so():
  host_only = XSPACE[:XSPACE.index('planes {\n  id: 1')]
  s = ps.summarize(ProfileData.from_text_proto(host_only))
  assert s['device_plane'] is None and 'no device plane' in s['note']


def test_kind_of_kernel_names():
  assert ps.kind_of('nvjet_sm90_tss_256x64') == 'matmul'
  assert ps.kind_of('cudnn_generated_fort_native_sdpa_sm90_flash_bprop') == 'attention'
  assert ps.kind_of('ncclDevKernel_AllReduce') == 'collective'
  assert ps.kind_of('MemcpyD2D') == 'copy'
  assert ps.kind_of('loop_convert_fusion_9') == 'fusion'
  assert ps.kind_of('rng_bit_generator') == 'other'
