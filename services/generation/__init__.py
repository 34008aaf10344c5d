"""Image, video and music generation: pipeline hosts, their registry, jobs behind the gate."""
