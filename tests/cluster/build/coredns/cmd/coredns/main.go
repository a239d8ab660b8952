// coredns is CoreDNS with only the plugins the local cluster's DNS uses: a full build
// compiles every cloud provider's SDK. This is CoreDNS's documented way to choose plugins
// outside its tree (a main that imports them and sets dnsserver.Directives, in the order
// of CoreDNS's plugin.cfg).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
