"""The director: turns audio, the reference image and instructions into a storyline."""

from engines.director.base import Director, PlanRequest, StaticDirector

__all__ = ["Director", "PlanRequest", "StaticDirector"]
