"""The ``portrait`` engine (CPU): a talking portrait of one or two faces from one photo.

Modules: ``framing`` (where the frame sits on the photo, and the fill past
it), ``rig`` (controls to a coarse warp field per face), ``mouth`` (the jaw's
torn field, lip shapes and the painted interior), ``motion`` (slow controls
over time per character, listening), ``engine`` (the cascade stages).
"""

from engines.portrait.engine import Character, PortraitEngine, PreparedPortrait
from engines.portrait.framing import Framing, frame_faces, render_framed
from engines.portrait.motion import blueprint_controls
from engines.portrait.rig import CONTROLS, IDX, N_BLUEPRINT, tps_matrix

__all__ = [
    "CONTROLS", "IDX", "N_BLUEPRINT", "Character", "Framing", "PortraitEngine", "PreparedPortrait",
    "blueprint_controls", "frame_faces", "render_framed", "tps_matrix",
]
