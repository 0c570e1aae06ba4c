/* Argument structs shared by C and Python, each declared once, here in C.
 *
 * A struct is a field list macro: FIELDS(I, F) names its fields in order, I(name) for an
 * int64 (an integer or an address), F(name) for a double. Every field is 8 bytes wide, so the
 * layout has no padding on any ABI. C_STRUCT(Name, FIELDS) declares the typedef;
 * C_STRUCT_LAYOUT(Name, FIELDS), in exactly one source file of the library, exports the field
 * list as a string ("q:i k:i ... scale:d ...") and the struct's size, from which
 * infinite_llm/native/structs.py builds the ctypes.Structure: nothing is mirrored by hand (C
 * keeps fields in declaration order, so one list gives both sides the same offsets), and the
 * size is checked when the library loads. */
#ifndef INFINITE_LLM_C_STRUCT_H
#define INFINITE_LLM_C_STRUCT_H
#include <stdint.h>

#define C_STRUCT_I_(name) int64_t name;
#define C_STRUCT_F_(name) double name;
#define C_STRUCT_NAME_I_(name) #name ":i "
#define C_STRUCT_NAME_F_(name) #name ":d "

#define C_STRUCT(Name, FIELDS) typedef struct { FIELDS(C_STRUCT_I_, C_STRUCT_F_) } Name;
#define C_STRUCT_LAYOUT(Name, FIELDS)                                                             \
    const char Name##_layout[] = FIELDS(C_STRUCT_NAME_I_, C_STRUCT_NAME_F_);                      \
    const int64_t Name##_size = (int64_t)sizeof(Name);
#endif
