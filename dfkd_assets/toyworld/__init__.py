"""The offline miniature world (procedural domains; tiny CLIP and VQGAN come with issue #4)."""
