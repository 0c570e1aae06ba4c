"""Native CPU kernels: compiling C at first use (``build``) and the argument structs shared by
C and ctypes, each declared once, in C (``structs``, ``csrc/c_struct.h``)."""
