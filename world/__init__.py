"""The synthetic identity-video world (synth) and its judges (face_nets, judges): no data set or weights can be downloaded, so the method trains and is measured here."""
