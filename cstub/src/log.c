/* One-line diagnostics on stderr, and the size parser for OMNI_GPU_MEMORY_LIMIT. */
#define _GNU_SOURCE
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <unistd.h>

#include "omni.h"

void omni_log(const char *fmt, ...) {
    char line[512];
    int n = snprintf(line, sizeof line, "omni-cuda[%d]: ", (int)getpid());
    va_list args;
    va_start(args, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, args);
    va_end(args);
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    /* write(2), not stdio: this may run inside an interposed call before stdio is usable. */
    ssize_t ignored = write(STDERR_FILENO, line, (size_t)n);
    (void)ignored;
}

static const struct {
    const char *suffix;
    double factor;
} units[] = {
    {"", 1},          {"b", 1},
    {"k", 1e3},       {"kb", 1e3},       {"ki", 1024.0},        {"kib", 1024.0},
    {"m", 1e6},       {"mb", 1e6},       {"mi", 1048576.0},     {"mib", 1048576.0},
    {"g", 1e9},       {"gb", 1e9},       {"gi", 1073741824.0},  {"gib", 1073741824.0},
    {"t", 1e12},      {"tb", 1e12},      {"ti", 1099511627776.0}, {"tib", 1099511627776.0},
};

/* "2GiB", "512MiB", "1.5GB", "1000000": binary units with an i, decimal ones without. */
bool omni_parse_size(const char *text, uint64_t *out) {
    char *end;
    double number = strtod(text, &end);
    if (end == text || !isfinite(number) || number < 0) return false;
    while (isspace((unsigned char)*end)) end++;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcasecmp(end, units[i].suffix) == 0) {
            double bytes = number * units[i].factor;
            if (bytes >= 18446744073709551615.0) return false;
            *out = (uint64_t)bytes;
            return true;
        }
    }
    return false;
}
