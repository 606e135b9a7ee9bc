/*
 * libmaxminddb timing for geo/benches/select.rs: the same addresses, the same batch scheme,
 * the same field (country_code), so the Rust numbers have a C reference beside them.
 *
 * usage: libmaxminddb_lookup DB ADDRESSES_FILE BATCH RUN_MS
 * Prints one line per batch: nanoseconds per lookup in that batch.
 */
#include <maxminddb.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DB ADDRESSES_FILE BATCH RUN_MS\n", argv[0]);
        return 2;
    }
    MMDB_s mmdb;
    if (MMDB_open(argv[1], MMDB_MODE_MMAP, &mmdb) != MMDB_SUCCESS) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 1;
    }
    FILE *f = fopen(argv[2], "r");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", argv[2]);
        return 1;
    }
    size_t cap = 16384, n = 0;
    struct sockaddr_storage *addrs = calloc(cap, sizeof *addrs);
    char line[128];
    while (fgets(line, sizeof line, f) && n < cap) {
        line[strcspn(line, "\r\n")] = 0;
        struct addrinfo hints = {0}, *res = NULL;
        hints.ai_flags = AI_NUMERICHOST;
        if (getaddrinfo(line, NULL, &hints, &res) == 0 && res) {
            memcpy(&addrs[n++], res->ai_addr, res->ai_addrlen);
            freeaddrinfo(res);
        }
    }
    fclose(f);
    if (n == 0) {
        fprintf(stderr, "no addresses\n");
        return 1;
    }
    long batch = atol(argv[3]);
    double run_ns = atof(argv[4]) * 1e6;
    size_t i = 0;
    volatile size_t sink = 0;
    /* Warm-up batch, as the Rust side does. */
    for (int pass = 0; pass < 2; pass++) {
        double start = now_ns();
        do {
            double t = now_ns();
            for (long b = 0; b < batch; b++, i++) {
                int err = 0;
                MMDB_lookup_result_s r =
                    MMDB_lookup_sockaddr(&mmdb, (struct sockaddr *)&addrs[i % n], &err);
                if (err == MMDB_SUCCESS && r.found_entry) {
                    MMDB_entry_data_s data;
                    if (MMDB_get_value(&r.entry, &data, "country_code", NULL) == MMDB_SUCCESS &&
                        data.has_data) {
                        sink += data.data_size;
                    }
                }
            }
            if (pass == 1) {
                printf("%.2f\n", (now_ns() - t) / (double)batch);
            }
        } while (pass == 1 && now_ns() - start < run_ns);
    }
    MMDB_close(&mmdb);
    free(addrs);
    return sink == (size_t)-1;
}
