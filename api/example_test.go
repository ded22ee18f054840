package api_test

import (
	"fmt"
	"net/http"

	"github.com/shoalhq/shoal/api"
	"github.com/shoalhq/shoal/configs"
)

// How the worker mounts the API beside its other HTTP routes. backend is
// the worker's implementation of api.Backend.
func ExampleNew() {
	var backend api.Backend // the worker's adapter over its Engine and broker client
	cfg := configs.Default()
	h, err := api.New(api.Config{
		API:  cfg.API,                // key from $SHOAL_API_KEY (api.key_env)
		Bans: api.NewMemoryBans(nil), // or a persistent, cluster-wide BanStore
	}, backendOrNil(backend))
	if err != nil {
		fmt.Println(err)
		return
	}
	mux := http.NewServeMux()
	mux.Handle(api.Prefix, h) // POST /api/v1/publish, /api/v1/history, ...
	fmt.Println(api.Prefix)
	// Output: /api/v1/
}

func backendOrNil(b api.Backend) api.Backend {
	if b == nil {
		return nopBackend{}
	}
	return b
}

// nopBackend stands in for the worker's backend in the example.
type nopBackend struct{ api.Backend }
