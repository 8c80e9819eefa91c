# A small DAT++ for the CPU demo: every stage holds a neighborhood and a deformable block.
dat_mini = dict(version=2, dims=(24, 48, 96, 192), depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), groups=(1, 1, 2, 4),
                blocks=('ND', 'ND', 'ND', 'DD'))
