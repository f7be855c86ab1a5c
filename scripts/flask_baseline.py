"""Run the Flask baseline by hand: python scripts/flask_baseline.py --model-dir model_store/work/digits --port 5000

`servekit bench NAME --baseline flask` starts and stops it for you; this is the same app (servekit.measure.flask_peer).
"""

from servekit.measure.flask_peer import main

if __name__ == "__main__":
    main()
