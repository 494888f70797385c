#ifndef FARMGATE_CCURL_SHIM_H
#define FARMGATE_CCURL_SHIM_H
#include <curl/curl.h>

// curl_easy_setopt and curl_easy_getinfo are variadic C functions, which Swift cannot call.
// These typed wrappers are the only bridge; each passes one argument of the type libcurl expects.
static inline CURLcode fg_curl_setopt_long(CURL *handle, CURLoption option, long value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLcode fg_curl_setopt_string(CURL *handle, CURLoption option, const char *value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLcode fg_curl_setopt_pointer(CURL *handle, CURLoption option, void *value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLcode fg_curl_setopt_slist(CURL *handle, CURLoption option, struct curl_slist *value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLcode fg_curl_setopt_off(CURL *handle, CURLoption option, curl_off_t value) {
    return curl_easy_setopt(handle, option, value);
}
typedef size_t (*fg_curl_write_callback)(char *ptr, size_t size, size_t nmemb, void *userdata);
static inline CURLcode fg_curl_setopt_write_function(CURL *handle, CURLoption option, fg_curl_write_callback cb) {
    return curl_easy_setopt(handle, option, cb);
}
static inline CURLcode fg_curl_getinfo_long(CURL *handle, CURLINFO info, long *value) {
    return curl_easy_getinfo(handle, info, value);
}
static inline CURLcode fg_curl_getinfo_double(CURL *handle, CURLINFO info, double *value) {
    return curl_easy_getinfo(handle, info, value);
}

// Added for the uploader's HTTPClient.
typedef size_t (*fg_curl_header_callback)(char *buffer, size_t size, size_t nitems, void *userdata);
static inline CURLcode fg_curl_setopt_header_function(CURL *handle, fg_curl_header_callback cb) {
    return curl_easy_setopt(handle, CURLOPT_HEADERFUNCTION, cb);
}
typedef int (*fg_curl_xferinfo_callback)(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow);
static inline CURLcode fg_curl_setopt_xferinfo_function(CURL *handle, fg_curl_xferinfo_callback cb) {
    return curl_easy_setopt(handle, CURLOPT_XFERINFOFUNCTION, cb);
}
// Added for the uploader's last check before a request leaves: CURLOPT_PREREQFUNCTION (libcurl 7.80) runs once the
// connection is up, just before the request is sent; a non-zero answer (CURL_PREREQFUNC_ABORT) stops the transfer with
// CURLE_ABORTED_BY_CALLBACK and nothing of the request is sent.
typedef int (*fg_curl_prereq_callback)(void *clientp, char *conn_primary_ip, char *conn_local_ip, int conn_primary_port,
                                       int conn_local_port);
static inline CURLcode fg_curl_setopt_prereq_function(CURL *handle, fg_curl_prereq_callback cb) {
    return curl_easy_setopt(handle, CURLOPT_PREREQFUNCTION, cb);
}
// curl_global_init with CURL_GLOBAL_DEFAULT (a macro Swift does not import).
static inline CURLcode fg_curl_global_init_default(void) {
    return curl_global_init(CURL_GLOBAL_DEFAULT);
}
// CURL_ERROR_SIZE as a value Swift can read.
static inline size_t fg_curl_error_size(void) {
    return CURL_ERROR_SIZE;
}
// Added for the ingest's SMTP notifications: the message is read from memory by this callback.
typedef size_t (*fg_curl_read_callback)(char *buffer, size_t size, size_t nitems, void *userdata);
static inline CURLcode fg_curl_setopt_read_function(CURL *handle, fg_curl_read_callback cb) {
    return curl_easy_setopt(handle, CURLOPT_READFUNCTION, cb);
}
// Added for HTTP/2: the CURLOPT_HTTP_VERSION values the client sets, and those CURLINFO_HTTP_VERSION reports, as plain
// longs (curl.h declares them in an anonymous enum).
static const long FG_CURL_HTTP_VERSION_1_0 = CURL_HTTP_VERSION_1_0;
static const long FG_CURL_HTTP_VERSION_1_1 = CURL_HTTP_VERSION_1_1;
static const long FG_CURL_HTTP_VERSION_2_0 = CURL_HTTP_VERSION_2_0;
static const long FG_CURL_HTTP_VERSION_2TLS = CURL_HTTP_VERSION_2TLS;
static const long FG_CURL_HTTP_VERSION_3 = CURL_HTTP_VERSION_3;
#endif
