// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: also implements Window.Callback, KeyEvent.Callback, ... (not used by the shell).
package android.app;

import android.content.Intent;
import android.os.Bundle;
import android.view.ContextThemeWrapper;
import android.view.View;
import android.view.Window;

public class Activity extends ContextThemeWrapper {
    public Activity() {
        throw new UnsupportedOperationException("declaration only");
    }

    public Intent getIntent() {
        throw new UnsupportedOperationException("declaration only");
    }

    protected void onCreate(Bundle savedInstanceState) {
        throw new UnsupportedOperationException("declaration only");
    }

    protected void onDestroy() {
        throw new UnsupportedOperationException("declaration only");
    }

    public void setContentView(View view) {
        throw new UnsupportedOperationException("declaration only");
    }

    public final void runOnUiThread(Runnable action) {
        throw new UnsupportedOperationException("declaration only");
    }

    public void finishAndRemoveTask() {
        throw new UnsupportedOperationException("declaration only");
    }

    public Window getWindow() {
        throw new UnsupportedOperationException("declaration only");
    }
}
