"""Media files the data tests write (test-only helpers)."""
import numpy as np


def write_audio_only(path) -> None:
  """An .mp4 with one AAC stream and no video stream (a video with zero decodable frames)."""
  import av
  with av.open(str(path), 'w') as c:
    s = c.add_stream('aac', rate=16000)
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='fltp', layout='mono')
    fr.sample_rate = 16000
    for _ in range(3):
      fr.pts = None
      for pkt in s.encode(fr):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)
