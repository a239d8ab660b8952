// nodeprobe is the local node's test image: one static binary with no shell and no libc,
// so a scratch image holds nothing else. Its subcommands are what the node's own tests
// need from a container:
//
//	nodeprobe serve [ADDR]   HTTP: "/" answers "hello from <hostname>", "/env/NAME" an
//	                         environment variable, "/get?url=U" fetches U (pod-to-Service)
//	nodeprobe get URL        fetch URL once, print the body (for `kubectl exec`)
//	nodeprobe lookup NAME    resolve NAME with the pod's resolv.conf, print the addresses
//	nodeprobe crash [CODE]   print a line and exit with CODE (default 3)
//	nodeprobe cat FILE       print a file
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

func get(url string) (string, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

func serve(addr string) error {
	host, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s\n", host)
	})
	mux.HandleFunc("/env/{name}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, os.Getenv(r.PathValue("name")))
	})
	mux.HandleFunc("/get", func(w http.ResponseWriter, r *http.Request) {
		body, err := get(r.URL.Query().Get("url"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		io.WriteString(w, body)
	})
	fmt.Printf("serving on %s\n", addr)
	return http.ListenAndServe(addr, mux)
}

func main() {
	args := os.Args[1:]
	if len(args) == 0 {
		args = []string{"serve"}
	}
	arg := func(i int, def string) string {
		if len(args) > i {
			return args[i]
		}
		return def
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(arg(1, ":8080"))
	case "get":
		var body string
		if body, err = get(arg(1, "")); err == nil {
			fmt.Print(body)
		}
	case "lookup":
		var addrs []string
		if addrs, err = net.LookupHost(arg(1, "")); err == nil {
			for _, a := range addrs {
				fmt.Println(a)
			}
		}
	case "crash":
		code, _ := strconv.Atoi(arg(1, "3"))
		fmt.Printf("crashing with exit code %d\n", code)
		os.Exit(code)
	case "cat":
		var data []byte
		if data, err = os.ReadFile(arg(1, "")); err == nil {
			os.Stdout.Write(data)
		}
	default:
		err = fmt.Errorf("unknown command %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nodeprobe:", err)
		os.Exit(1)
	}
}
